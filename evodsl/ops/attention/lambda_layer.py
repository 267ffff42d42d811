"""mha(lambda, k=16, u=1, r=23): LambdaNetworks' lambda layer (Bello 2021) over a 1-D sequence.

Queries q_n^h in R^k (h heads), keys K_m in R^{k x u} and values V_m in R^{v x u} (one key and one value per
K/V group: the paper's multi-query lambdas, kv_heads=1; kv_heads=G gives each group of h/G heads its own),
v the head width (d/h: the heads' outputs concatenate to d). Each query reads a linear function, its lambda:

    content lambda   lam^c      = sum_{m, u} softmax_m(K)[m, :, u] V[m, :, u]^T              in R^{k x v}
    position lambda  lam^p_n    = sum_{m, u} E[m - n, :, u] V[m, :, u]^T   (|m - n| <= (r-1)/2)  in R^{k x v}
    output           y_n^h      = (lam^c + lam^p_n)^T q_n^h                                   in R^v

(the keys softmaxed over the positions, per channel). The paper's global relative embeddings E_{nm} cost
O(n^2 k v); its lambda convolution, for large inputs, restricts E to a local scope of r relative positions and
computes every lam^p_n as a convolution over the positions: this is that form (the 1-D sequence's), O(n r k v u),
never n x n. The paper's batch norms on the queries and values are left to the model (norm ops).
The content lambda sums every position: bidirectional only here. A causal form would take prefix sums of the
softmax's numerator and denominator over m <= n (per channel, with a running max for its exp) and the
position lambda's scope r back (a left-padded convolution); not built.
Padding: padded keys take no softmax weight and padded values are zeroed, so no lambda reads them, whichever
side the padding is on. No attention weights: no dropout.
"""
from __future__ import annotations

from dataclasses import replace

import sympy as sp
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..cost import Cost, Symbols, linear
from ..registry import Op, OpEnv, ShapeProblem, register
from ._common import AttentionParams, attention_shape


class LambdaParams(AttentionParams):
    kv_heads: int | None = Field(1, ge=1, description="key/value groups, each one lambda for heads/kv_heads "
                                                        "query heads; 1 = the paper's multi-query lambdas")
    k: int = Field(16, ge=1, le=4096, description="query and key depth |k|")
    u: int = Field(1, ge=1, le=64, description="intra-depth |u|: keys and values u-deep, summed in the lambdas")
    r: int = Field(23, ge=1, le=4095, description="scope of the position lambdas (odd): relative positions "
                                                  "|m - n| <= (r-1)/2")


def lambda_shape(p: LambdaParams, env: OpEnv):
    if p.dropout:
        raise ShapeProblem("mha(lambda) never forms attention weights, so it has none to drop out", "dropout",
                           "remove dropout=, or put dropout(standard) on the stream")
    if p.r % 2 == 0:
        raise ShapeProblem(f"r={p.r} is even: the scope is centred on the query", "r",
                           f"r counts the relative positions -(r-1)/2 .. (r-1)/2: try r={p.r + 1}")
    return attention_shape(p, env)


class LambdaLayer(nn.Module):
    def __init__(self, p: LambdaParams, env: OpEnv):
        super().__init__()
        d = env.d
        self.heads, self.kv_heads = p.heads, p.kv_heads or p.heads
        self.head_dim = p.head_dim or d // p.heads  # v, the value depth
        self.k, self.u, self.r = p.k, p.u, p.r
        self.q_proj = nn.Linear(d, self.heads * p.k, bias=p.bias)
        self.k_proj = nn.Linear(d, self.kv_heads * p.k * p.u, bias=p.bias)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim * p.u, bias=p.bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=p.bias)
        # E[i, t, c]: channel c of the embedding of relative position t - (r-1)/2, intra-depth i
        self.E = nn.Parameter(torch.empty(p.u, p.r, p.k).normal_(0.0, p.k ** -0.5))

    def forward(self, x, ctx):
        b, n, _ = x.shape
        G, K, U, V = self.kv_heads, self.k, self.u, self.head_dim
        q = self.q_proj(x).view(b, n, G, self.heads // G, K)
        keys = self.k_proj(x).view(b, n, G, K, U)
        values = self.v_proj(x).view(b, n, G, V, U)
        mask = ctx.mask if ctx is not None else None
        if mask is not None:  # padded positions: no softmax weight, zero values
            pad = ~mask[:, :, None, None, None]
            keys, values = keys.masked_fill(pad, float("-inf")), values.masked_fill(pad, 0.0)
        # the content lambda, [b, G, V, K]: sum_{m,u} V[m, :, u] softmax_m(K)[m, :, u]^T
        content = torch.einsum("bngvu,bngku->bgvk", values, keys.softmax(1))
        del keys
        # the position lambdas, [b, n, G, V, K]: each position's window of r values (zero beyond the ends),
        # times E: the lambda convolution
        half = (self.r - 1) // 2
        window = F.pad(values, (0, 0, 0, 0, 0, 0, half, half)).unfold(1, self.r, 1)  # [b, n, G, V, U, r]
        del values
        lam = window.reshape(b, n, G, V, U * self.r) @ self.E.view(U * self.r, K)
        del window
        lam += content[:, None]
        y = q @ lam.transpose(-1, -2)  # [b, n, G, h/G, V]: (lam^c + lam^p_n)^T q_n^h
        return self.o_proj(y.view(b, n, self.heads * V))


def lambda_cost(p: LambdaParams, env: OpEnv, s: Symbols) -> Cost:
    """The projections (q: h k, keys: G k u, values: G v u wide), the content lambda (an einsum over n u per
    group), the position lambdas (each position's r u values times E: [b n G v, r u] @ [r u, k]) and the
    output (q^T lam per head). Memory: the padded values and their window copy, the lambdas [b, n, G, v, k]."""
    h, by, b, n, d = s.sym("h", p.heads), s.bytes, s.b, s.n, s.d
    G = s.sym("G", p.kv_heads or p.heads)
    v = d / h if p.head_dim is None else s.sym("v", p.head_dim)
    K, U, r = s.sym("k", p.k), s.sym("u", p.u), s.sym("r", p.r)
    proj = (linear(s, d, h * K, p.bias) + linear(s, d, G * K * U, p.bias) + linear(s, d, G * v * U, p.bias)
            + linear(s, h * v, d, p.bias))
    content, position, output = 2 * b * n * G * U * K * v, 2 * b * n * G * v * U * r * K, 2 * b * n * h * K * v
    keys, vals, lams = b * n * G * K * U, b * n * G * v * U, b * n * G * v * K
    core = Cost(params=U * r * K, fwd=content + position + output, bwd=2 * (content + position + output),
                fwd_other=5 * keys + lams, bwd_other=10 * keys + 2 * lams)
    q, out, y = b * n * h * K * by, b * n * d * by, b * n * h * v * by
    lam, padded, window = lams * by, b * (n + r - 1) * G * v * U * by, b * n * G * v * U * r * by
    # copies: einsum's bmm reads the softmaxed keys and the values as [b G, ., n u]: views only for u = 1 and
    # b = 1 or G = 1; the window [b n G v, r u] is a view of the padded values only for u = 1 and b = 1
    one_group = (p.kv_heads or p.heads) == 1
    copies = 1 if p.u > 1 else (0 if one_group else sp.Min(1, b - 1))
    window_copy = 1 if p.u > 1 else sp.Min(1, b - 1)
    # kept: q; softmax's output (and einsum's copy of it); the values (or einsum's copy); the window (or the
    # padded values it views); the lambdas; o_proj's input
    saved = q + keys * by * (1 + copies) + vals * by + window_copy * window + (1 - window_copy) * padded + lam + y
    c = b * G * v * K * by  # the content lambda
    peak = sp.Max(q + (keys + vals) * by * (2 + copies),  # at the content lambda
                  q + c + padded + window_copy * window + lam,  # at the position lambdas
                  q + c + lam + y + out) - out  # at o_proj
    # backward: q's and the lambdas' gradients (y's beside, y released); then the window's beside them and the
    # content lambda's, q, the lambdas and y released
    bwd = sp.Max(q + lam, window + c - y)
    return replace(proj + core, saved=saved, peak=peak, bwd_peak=bwd, saves_input=True, saves_output=False, cache=0)


OP = register(Op(
    decode=None,  # bidirectional only: the content lambda sums every position
    family="mha", variant="lambda", params=LambdaParams, module=LambdaLayer,
    causal="no", shape=lambda_shape, cost=lambda_cost,
    paper="LambdaNetworks: Modeling Long-Range Interactions Without Attention, Bello 2021, arXiv:2102.08602",
    summary="y_n = (lam^c + lam^p_n)^T q_n: content lambda softmax_m(K)^T V, position lambdas E V over a scope "
            "of r (the lambda convolution); O(n r k v)",
    note="",  # no note in the reference; CATALOG.md lists it (afa)
))
