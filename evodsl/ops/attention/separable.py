"""mha(separable): MobileViTv2's separable self-attention (Mehta & Rastegari 2022), O(n d)

    c = softmax_n(X W_I)            one context score per token (W_I: d -> 1), a softmax over the n positions
    c_v = sum_i c_i K_i             the context vector, K = X W_K
    o = (ReLU(X W_V) * c_v) W_O     (* elementwise, c_v broadcast to every position)

No query heads and no n x n or d x d product: every token reads the one context vector. heads=h (ours)
generalises it as the paper's code does per channel group: W_I gives h scores per token, each head i pools its
own dh channels of K with its own softmax, and scales its channels of ReLU(V); heads=1 (the default) is the
paper's. Dropout, as the paper's code, drops context scores (after the softmax, training only). K/V heads (GQA)
have no meaning without query heads: there is no kv_heads parameter. No position scheme (none in the paper).

No causal form: the softmax over n is global. A prefix form (c_v at i pooling j <= i with a softmax over them)
is well defined, but needs a running-max rescaled scan to be stable in float32; the paper (a vision encoder)
has none. Padding: padded tokens get no context score, so a padded batch equals each sequence alone.
"""
from __future__ import annotations

from dataclasses import replace

import sympy as sp
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..cost import Cost, Symbols, linear
from ..registry import Op, OpEnv, OpParams, register
from ._common import AttentionParams, attention_shape


class SeparableParams(OpParams):
    heads: int = Field(1, ge=1, le=4096, description="context scores per token, one per head (1: the paper's)")
    head_dim: int | None = Field(None, ge=1, le=4096, description="width of one head; default d_model / heads")
    bias: bool = Field(True, description="biases on the score, key, value and output projections")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the context scores (training only)")


def separable_shape(p: SeparableParams, env: OpEnv):
    """attention_shape's checks (a [b, n, d] stream, heads dividing d_model unless head_dim is set)."""
    return attention_shape(AttentionParams(heads=p.heads, head_dim=p.head_dim), env)


class SeparableAttention(nn.Module):
    def __init__(self, p: SeparableParams, env: OpEnv):
        super().__init__()
        d = env.d
        self.heads, self.head_dim, self.dropout = p.heads, p.head_dim or d // p.heads, p.dropout
        D = self.heads * self.head_dim
        self.score = nn.Linear(d, self.heads, bias=p.bias)  # W_I
        self.k_proj = nn.Linear(d, D, bias=p.bias)
        self.v_proj = nn.Linear(d, D, bias=p.bias)
        self.o_proj = nn.Linear(D, d, bias=p.bias)

    def forward(self, x, ctx=None):
        b, n, _ = x.shape
        h, dh = self.heads, self.head_dim
        c = self.score(x)  # [b, n, h]
        mask = ctx.mask if ctx is not None else None
        if mask is not None:  # padded tokens get no context score
            c = c.masked_fill(~mask[:, :, None], float("-inf"))
        c = F.dropout(c.softmax(1), self.dropout, self.training)
        k = self.k_proj(x).view(b, n, h, dh).transpose(1, 2)  # [b, h, n, dh]
        cv = c.transpose(1, 2).unsqueeze(2) @ k  # [b, h, 1, dh]: sum_i c_i K_i per head
        v = torch.relu_(self.v_proj(x)).view(b, n, h, dh)  # in place: nn.Linear keeps no output
        return self.o_proj((v * cv.transpose(1, 2)).view(b, n, h * dh))


def separable_cost(p: SeparableParams, env: OpEnv, s: Symbols) -> Cost:
    """The score, key, value and output projections; the context vectors c^T K ([1, n] @ [n, dh] per head); the
    softmax over n and the product ReLU(V) * c_v are elementwise."""
    b, n, by = s.b, s.n, s.bytes
    h = s.sym("h", p.heads)
    dh = s.d / h if p.head_dim is None else s.sym("dh", p.head_dim)
    D = h * dh
    t, scores, out = b * n * D * by, b * n * h * by, b * n * s.d * by
    proj = linear(s, s.d, h, p.bias) + linear(s, s.d, D, p.bias).scaled(2) + linear(s, D, s.d, p.bias)
    ctx = 2 * b * h * n * dh
    other = 5 * b * n * h + 2 * b * n * D  # softmax; ReLU and the product
    drop = p.dropout > 0
    core = Cost(fwd=ctx, bwd=2 * ctx, fwd_other=other + (2 * b * n * h if drop else 0), bwd_other=2 * other)
    # kept: the softmax's output; what the matmul c^T K reads (the dropped scores; without dropout, with
    # heads > 1 and b > 1, a copy of c in its [b, h, 1, n] layout, and likewise of K); dropout's bool mask;
    # K (or its copy), ReLU(V), c_v, the product (o_proj's input)
    c_read = scores if drop else (scores * sp.Min(1, b - 1) if p.heads > 1 else 0)
    saved = scores + c_read + (scores / by if drop else 0) + 3 * t + b * D * by
    peak = scores + 3 * t + b * D * by  # at o_proj: c, K, ReLU(V), c_v, the product (and the output)
    # backward: the product's gradient, ReLU(V)'s and c_v's before its sum; then the projections' input
    # gradients (two summed out of place) beside the scores' two, everything saved released
    bwd = sp.Max(3 * t, 3 * out + 2 * scores - saved)
    return replace(proj + core, saved=saved, peak=peak, cache=0, saves_input=True, saves_output=False,
                   bwd_peak=bwd)


OP = register(Op(
    decode=None,  # bidirectional only: the softmax is over every position
    family="mha", variant="separable", params=SeparableParams, module=SeparableAttention,
    causal="no", shape=separable_shape, cost=separable_cost,
    paper="Separable Self-attention for Mobile Vision Transformers, Mehta & Rastegari 2022, arXiv:2206.02680",
    summary="c = softmax_n(X W_I), c_v = sum_i c_i K_i, o = (ReLU(V) * c_v) W_O; per head with heads > 1; O(n d)",
    note="MHA/SparseOrLowRank/013.md",
))
