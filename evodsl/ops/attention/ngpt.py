"""mha(ngpt): the normalized Transformer's attention (Loshchilov, Hsieh, Sun & Ginsburg 2024, nGPT, arXiv:2410.01131,
section 2.3, eq. 15-16): each head's query and key l2-normalised along the head dimension (after RoPE, as the
authors' code), then scaled per channel by a learned s_qk, and the softmax scale sqrt(dh) instead of 1/sqrt(dh)
(unit vectors' dot products lie in [-1, 1]):

    q = s_qk * Norm(W_q h),  k = s_qk * Norm(W_k h),  A = softmax(sqrt(dh) q k^T) (W_v h),  out = W_o A

s_qk has h dh entries (one per channel of every head; with grouped K/V heads, kv_heads < heads, a key head takes
the s_qk of the first query head of its group); as every nGPT scale it is stored at sqk_scale (default 1/sqrt(d))
and used as stored * (sqk_init / sqk_scale), starting at sqk_init = 1. It runs on SDPA (scale sqrt(dh)): the plain
path of mha(softmax), its K/V cache holding the normalised, scaled keys. No biases by default (nGPT has none);
the weight normalisation of W_q, W_k, W_v (rows) and W_o (columns) is evodsl.ngpt_normalize_'s (init=ngpt at the
start). The softmax modifiers, QKNorm, collaborative heads, residual scores and Transformer-XL's path are refused.
With RoPE the scores are not a function of the distance alone (s_qk scales the two channels of a rotated pair
differently), so a left-padded batch, which moves each row's tokens, is refused (E409); ALiBi and T5's bias keep it.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
import sympy as sp
from pydantic import Field
from torch import nn

from ..cost import Cost
from ..registry import Op, OpEnv, ShapeProblem, register, require_right_padding
from ._common import attention_shape, head_symbols, learned_bias, rotates
from .softmax import SoftmaxAttention, SoftmaxAttentionParams, softmax_attention_cost


class NgptAttentionParams(SoftmaxAttentionParams):
    bias: bool = Field(False, description="biases on the projections (nGPT: none)")
    sqk_init: float = Field(1.0, gt=0, le=100, description="s_qk's starting value")
    sqk_scale: float | None = Field(None, gt=0, le=1, description="s_qk's stored init; default 1/sqrt(d)")


def _shape(p: NgptAttentionParams, env: OpEnv):
    given = [f for f in ("softcap", "sink_logit", "talking", "collab", "qk_norm", "qk_len", "scale")
             if getattr(p, f) not in (None, False)]
    if given:
        raise ShapeProblem(f"mha(ngpt) normalises q and k itself, with the score scale sqrt(dh): it takes no "
                           f"{', '.join(given)}", given[0], "use mha(softmax) for them")
    if env.residual_scores or env.memory is not None or (env.pos is not None
                                                          and getattr(env.pos[0].attach, "relative", False)):
        raise ShapeProblem("mha(ngpt) runs no RealFormer residual scores and not Transformer-XL's path",
                           hint="drop residual(..., scores=true) / memory(xl) / pos(xl_rel)")
    return attention_shape(p, env)


class NgptAttention(SoftmaxAttention):
    def __init__(self, p: NgptAttentionParams, env: OpEnv):
        super().__init__(p, env)
        scale = p.sqk_scale if p.sqk_scale is not None else env.d ** -0.5
        self.sqk = nn.Parameter(torch.full((self.heads, self.head_dim), scale))
        self.sqk_gain = p.sqk_init / scale
        self.scale = math.sqrt(self.head_dim)
        self.rotates = rotates(env)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        if self.rotates and ctx is not None:
            require_right_padding(ctx.mask, "mha(ngpt) with a rotation (rope)",
                                  "s_qk scales the rotated channels one by one, so the scores read absolute positions")
        return super().forward(x, ctx)

    def qkv(self, x: torch.Tensor, offset: int = 0):
        q, k, v = super().qkv(x, offset)
        s = (self.sqk * self.sqk_gain)[:, None, :]  # [h, 1, dh]
        kv_s = s[:: self.heads // self.kv_heads]  # a key head: the first query head of its group
        return s * F.normalize(q, dim=-1), kv_s * F.normalize(k, dim=-1), v


def cost(p: NgptAttentionParams, env: OpEnv, s) -> Cost:
    """mha(softmax)'s with scale sqrt(dh), plus the normalisations: h dh parameters (s_qk); per element of q and k:
    square, sum, divide (3) and the scale (1); backward about twice. Kept beyond SDPA's own: q and k before the
    normalisation, their norms and clamped norms [b, heads, n, 1], and the normalised q and k (s_qk's gradient).
    The inference peak is mha(softmax)'s, with one more [b, h, n, dh] tensor at the kernel where the queries were
    not rotated and the heads are not grouped (measured: SDPA's copy of the scaled queries, which leave the
    multiplication by s_qk in another layout than the projection's view). The backward's peak: the fused kernel's
    (o's gradient and those of q, k, v; a rotation's copy released), or mha(softmax)'s later phases less what the
    normalisations kept (released by then); with dropout or a learned bias (the math kernel), mha(softmax)'s."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    base = softmax_attention_cost(p, env, s)
    q, k = b * n * h * dh, b * n * kv * dh
    norms = 2 * b * n * (h + kv)
    extra = Cost(params=h * dh, fwd_other=4 * (q + k), bwd_other=8 * (q + k), saved=(2 * q + 2 * k + norms) * by)
    flags = {f: getattr(base, f) for f in ("saves_input", "saves_output", "inplace", "inplace_in_training")}
    copy = q * by if p.kv_heads in (None, p.heads) and not rotates(env) else 0  # measured: see the docstring
    bwd = base.bwd_peak
    if not (p.dropout > 0 or learned_bias(env)):  # SDPA's fused kernel; the projections' phases come after the
        # normalisations' backward has released what they kept
        kernel = (2 * q + 2 * k) * by - (q * by if rotates(env) else 0)
        bwd = sp.Max(kernel, base.bwd_peak - extra.saved)
    return replace(base + extra, peak=base.peak + copy, bwd_peak=bwd, **flags)


OP = register(Op(
    decode="a K/V cache of every position so far (the normalised, scaled keys)",
    family="mha", variant="ngpt", params=NgptAttentionParams, module=NgptAttention, causal="yes", shape=_shape,
    supports=frozenset({"rope", "alibi", "t5_bias"}),
    paper="nGPT: Normalized Transformer with Representation Learning on the Hypersphere, Loshchilov et al. 2024, "
          "arXiv:2410.01131",
    summary="softmax(sqrt(dh) (s_qk Norm(q)) (s_qk Norm(k))^T) V per head, s_qk learned per channel",
    cost=cost,
))
