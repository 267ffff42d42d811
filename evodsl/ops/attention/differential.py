"""mha(differential, layer=l): differential attention (Ye et al. 2024, Differential Transformer, eqs. 1-3).

Each of the h heads has two query halves and two key halves of width dh, and one value of width 2 dh:

    [Q1; Q2] = X W_Q,  [K1; K2] = X W_K,  V = X W_V
    A = softmax(Q1 K1^T / sqrt(dh)) - lambda softmax(Q2 K2^T / sqrt(dh))
    lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init       (lq1, lk1, lq2, lk2: learned vectors of dh)
    head = (1 - lambda_init) RMSNorm(A V)                        (over the head's 2 dh channels)
    out = [head_1; ..; head_h] W_O

Heads as the paper: h heads of double width, dh = d / (2h) unless head_dim is set, so W_Q, W_K, W_V, W_O are
d x d as in softmax attention of 2h heads (the paper's parameter count; the authors' code's layout: query
channels [2 i dh, 2 i dh + dh) are head i's Q1, the next dh its Q2, likewise for keys; V and the output heads
2 dh wide). lambda and the norm's weight (2 dh) are shared by the layer's heads (the authors' code); the paper's
"GroupNorm" is, in that code, RMSNorm per head (eps 1e-5, a learned weight), which this op follows.
lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1)) needs the layer's depth l (1-based): an op does not learn its depth
from the model, so it is the param layer= (default 1: lambda_init 0.2), or lambda_init= itself.
Grouped K/V heads (kv_heads): each K/V head (its two key halves and its value) serves heads / kv_heads heads.

Both maps run through F.scaled_dot_product_attention. Its fused CPU kernel needs values as wide as the keys, so
each map runs twice, over V's two halves of dh (the form of the authors' multihead_flashdiff_2): four calls, no
n x n tensor; the q k^T products are computed twice (the cost counts them). Causal: both maps causal, the
difference of two causal maps; decoding keeps K (both halves) and V of every position. rope rotates each query
and key half (2h heads of dh, as the authors' code); ALiBi adds its bias to both maps, a slope per diff head.
Padding: padded keys get no weight in either map. dropout= is refused (the paper's dropout acts on the
difference A, which no fused call forms).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...decode import append_kv
from ..registry import Op, OpEnv, ShapeProblem, register
from ._common import AttentionBase, AttentionParams, score_bias
from ._differential_cost import differential_cost
from .isab import no_dropout_shape


class DifferentialParams(AttentionParams):
    layer: int = Field(1, ge=1, le=4096, description="the layer's depth l (1-based): lambda_init = 0.8 - 0.6 "
                                                     "exp(-0.3 (l - 1))")
    lambda_init: float | None = Field(None, ge=0.0, lt=1.0, description="lambda_init itself (default: from layer)")


def lambda_init(p: DifferentialParams) -> float:
    return p.lambda_init if p.lambda_init is not None else 0.8 - 0.6 * math.exp(-0.3 * (p.layer - 1))


def differential_shape(p: DifferentialParams, env: OpEnv):
    no_dropout_shape("mha(differential)")(p, env)
    if p.head_dim is None and env.d % (2 * p.heads):
        raise ShapeProblem(f"d_model {env.d} is not divisible by 2 * heads = {2 * p.heads}: each head has two "
                           f"query and key halves of d_model / (2 heads)", "heads",
                           "set heads to a divisor of d_model / 2, or set head_dim")
    return env.shape


class DifferentialAttention(AttentionBase):
    def __init__(self, p: DifferentialParams, env: OpEnv):
        h, kv = p.heads, p.kv_heads or p.heads
        dh = p.head_dim or env.d // (2 * h)
        # the projections of 2h half-heads of dh (2 kv key halves), which is also V's kv heads of 2 dh
        super().__init__(AttentionParams(heads=2 * h, kv_heads=2 * kv, head_dim=dh, bias=p.bias), env)
        self.diff_heads, self.diff_kv = h, kv
        self.lambda_init = lambda_init(p)
        g = torch.Generator().manual_seed(0)
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.randn(dh, generator=g) * 0.1) for _ in range(4))  # the authors' N(0, 0.1) init
        self.norm = nn.RMSNorm(2 * dh, eps=1e-5)
        if score_bias(env):  # ALiBi: one slope per diff head (h, not 2h)
            self.pos = env.pos[0].attach(env.pos[1], h, dh)

    def lam(self) -> torch.Tensor:
        return (torch.exp((self.lambda_q1 * self.lambda_k1).sum()) - torch.exp((self.lambda_q2 * self.lambda_k2).sum())
                + self.lambda_init)

    def project(self, x: torch.Tensor, offset: int = 0):
        """q [b, 2h, n, dh], k [b, 2kv, n, dh] (half-heads, rotated), v [b, kv, n, 2 dh]."""
        b, n, _ = x.shape
        dh = self.head_dim
        q = self.q_proj(x).view(b, n, self.heads, dh).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, dh).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.diff_kv, 2 * dh).transpose(1, 2)
        if self.pos is not None:
            q, k = self.pos.rotate(q, k, offset)
        return q, k, v

    def attend(self, q, k, v, mask, causal: bool) -> torch.Tensor:
        """The two maps, each over V's two halves (4 SDPA calls), their difference normalised: [b, h, n, 2 dh]."""
        dh, gqa = self.head_dim, self.diff_heads != self.diff_kv
        va, vb = v[..., :dh], v[..., dh:]

        def sdpa(i, vv):
            return F.scaled_dot_product_attention(q[:, i::2], k[:, i::2], vv, attn_mask=mask, is_causal=causal,
                                                  enable_gqa=gqa)

        lam = self.lam()
        o = torch.cat((sdpa(0, va) - lam * sdpa(1, va), sdpa(0, vb) - lam * sdpa(1, vb)), dim=-1)
        return self.norm(o) * (1.0 - self.lambda_init)

    def _bias(self, start: int, n: int, keys: int, device):
        """ALiBi's [1, h, n, keys] bias (queries start.., keys 0..), -inf after each query when causal; else None."""
        if self.pos is None:
            return None
        i, j = torch.arange(start, start + n, device=device)[:, None], torch.arange(keys, device=device)[None, :]
        bias = self.pos.bias(i, j)
        if bias is None:
            return None
        if self.causal:
            bias = bias.masked_fill(j > i, float("-inf"))
        return bias.unsqueeze(0)

    def forward(self, x, ctx):
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        q, k, v = self.project(x)
        n = x.shape[1]
        mask = self.allowed(ctx, n, x.device)  # [b, 1, n, n] bool, or None (no padding)
        bias = self._bias(0, n, n, x.device)
        if bias is not None:
            bias = bias.to(q.dtype)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        return self.out(self.attend(q, k, v, mask, self.causal and mask is None))

    def _step(self, x, ctx):
        """Decoding: the new queries against the cached K (both halves) and V and their own."""
        start, n = ctx.offset, x.shape[1]
        q, k, v = self.project(x, start)
        k, v = append_kv(ctx, self, k, v)
        mask = self._bias(start, n, start + n, x.device)
        if mask is not None:
            mask = mask.to(q.dtype)
        elif self.causal and start and n > 1:  # a chunk after the cache: the causal mask aligned at the end
            mask = torch.arange(start + n, device=x.device)[None, :] <= torch.arange(start, start + n,
                                                                                      device=x.device)[:, None]
        return self.out(self.attend(q, k, v, mask, self.causal and mask is None and not start))


OP = register(Op(
    decode="a K/V cache of every position so far: both key halves and the 2 dh-wide values (kv_heads heads)",
    family="mha", variant="differential", params=DifferentialParams, module=DifferentialAttention,
    causal="yes", shape=differential_shape, supports=frozenset({"rope", "xpos", "alibi"}),
    paper="Differential Transformer, Ye et al. 2024, arXiv:2410.05258",
    summary="(1 - lambda_init) RMSNorm((softmax(Q1 K1^T / sqrt(dh)) - lambda softmax(Q2 K2^T / sqrt(dh))) V) per "
            "head, lambda = exp(lq1.lk1) - exp(lq2.lk2) + lambda_init(layer); h heads of 2 dh",
    note="", cost=differential_cost,
))
