"""mha(based): Based, linear attention with a 2nd-order Taylor feature map beside a small sliding-window softmax
attention (Arora, Eyuboglu, Zhang, Timalsina, Alberti, Zinsley, Zou, Rudra, Re 2024, arXiv:2402.18668, sections 3-4).

Per head, feature projections q~_t = x_t W_fq, k~_t = x_t W_fk (feature_dim = f wide), the Taylor map

    phi(x) = [1, x / f^(1/4), (x (x) x) / (sqrt(2) sqrt(f))]      (1 + f + f^2 features)
    so  phi(q~)^T phi(k~) = 1 + s + s^2 / 2,  s = q~^T k~ / sqrt(f)   (exp(s) to second order, always >= 1/2)

    lin_t = sum_{j<=t} phi(q~_t)^T phi(k~_j) v_j / sum_{j<=t} phi(q~_t)^T phi(k~_j)
    win_t = sum_{t-w<j<=t} softmax_j(q_t^T k_j / sqrt(dh)) v_j          (the last w = window tokens)
    y_t   = (lin_t + win_t) W_O          (heads concatenated)

The linear part runs chunked (_feature_linear.py over _chunked_linear.py: the state [S z], (1 + f + f^2) x (dh + 1)
a head); the window is SDPA on blocks of queries (_banded.py, as mha(local)). Decoding keeps the linear state and
the last w keys and values: constant in the tokens seen.
Choices where the paper is silent or leaves it to its code (HazyResearch/based, fla's Based layer): the paper
stacks linear and window layers in a hybrid; here one op sums the two branches' heads before W_O, as the brief of
this op asks; the window branch has its own q, k (head_dim wide) and shares v with the linear branch; the full
outer product x (x) x (fla's TaylorFeatureMap), not its upper triangle; no eps in the denominator (it is >= 1/2 a
key); no position scheme. Grouped K/V heads (kv_heads) share W_fk, W_K and W_V.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ...decode import slot
from ..registry import Op, OpEnv, register
from ._banded import banded_attention
from ._based_cost import based_cost
from ._common import AttentionBase, AttentionParams
from ._feature_linear import normalised
from ._linear_recurrent import recurrent_shape


class BasedParams(AttentionParams):
    feature_dim: int = Field(16, ge=1, le=64, description="f: width of the feature projections (1 + f + f^2 "
                                                           "Taylor features)")
    window: int = Field(64, ge=1, le=65536, description="w: the sliding window's keys t-w+1 .. t")
    chunk: int = Field(64, ge=1, le=4096, description="tokens a chunk of the linear part's chunked form")


def taylor(x: torch.Tensor) -> torch.Tensor:
    """[..., f] -> [..., 1 + f + f^2]: [1, x / f^(1/4), x (x) x / (sqrt(2) sqrt(f))]."""
    f = x.shape[-1]
    outer = (x[..., :, None] * x[..., None, :]).flatten(-2)
    return torch.cat((torch.ones_like(x[..., :1]), x * f ** -0.25, outer * (2 * f) ** -0.5), -1)


class BasedAttention(AttentionBase):
    def __init__(self, p: BasedParams, env: OpEnv):
        super().__init__(p, env)
        self.f, self.window, self.chunk = p.feature_dim, p.window, p.chunk
        self.fq_proj = nn.Linear(env.d, self.heads * p.feature_dim, bias=p.bias)
        self.fk_proj = nn.Linear(env.d, self.kv_heads * p.feature_dim, bias=p.bias)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        b, n, _ = x.shape
        cache = ctx.cache if ctx is not None else None
        q, k, v = self.qkv(x)
        fq = taylor(self.fq_proj(x).view(b, n, self.heads, self.f).transpose(1, 2))
        fk = taylor(self.fk_proj(x).view(b, n, self.kv_heads, self.f).transpose(1, 2))
        mask = self.key_mask(ctx)
        if mask is not None:  # a padded position adds nothing to [S z]
            fk = fk * mask[:, None, :, None].to(fk.dtype)
        fk, ve = self.expand_kv(fk), self.expand_kv(v)
        if cache is not None:
            key = slot(ctx, self)
            old = cache.caches.get(key)
            lin, state = normalised(fq, fk, ve, None if old is None else old[0], self.chunk, step=n == 1)
            win, kept = self.window_attend(q, k, v, None if old is None else old[1:], ctx.offset, self.window)
            cache.caches[key] = (state, *kept)
        else:
            lin, _ = normalised(fq, fk, ve, None, self.chunk, symbolic=not isinstance(n, int))
            win = banded_attention(q, self.expand_kv(k), ve, self.window - 1, 0, key_mask=mask)
        return self.out(lin + win)


OP = register(Op(
    decode="the linear state [S z] ((1 + f + f^2) x (dh + 1) a query head) and the last w keys and values "
           "(kv_heads heads): constant in the tokens seen",
    family="mha", variant="based", params=BasedParams, module=BasedAttention,
    causal="yes", shape=recurrent_shape("mha(based)"), supports=frozenset(),
    paper="Simple linear attention language models balance the recall-throughput tradeoff, Arora et al. 2024, "
          "arXiv:2402.18668",
    summary="Taylor phi(x) = [1, x, x(x)x / sqrt(2)] (f = 16) linear attention, normalised, plus softmax over the "
            "last w = 64 keys; causal only; chunked, O(n C f^2 + n f^2 dh + n w dh)",
    cost=based_cost,
))
