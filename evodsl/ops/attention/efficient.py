"""mha(efficient): Efficient Attention (Shen, Zhang, Zhao, Yi & Li 2018/2021), the right product.

Per head, with the keys normalized over the positions and the queries over the channels,

    E(Q, K, V) = rho_q(Q) (rho_k(K)^T V),     G = rho_k(K)^T V in R^{dh x dh}

softmax normalization (the paper's main form): rho_q = softmax of each query row (over dh), rho_k = softmax of
each key column (over the n positions); scaling normalization: rho_q(Q) = Q / sqrt(n), rho_k(K) = K / sqrt(n).
G is a dh x dh global context per head: O(n dh^2) time, O(dh^2) besides the projections, never n x n. Every
position reads every other through G: no causal form (the paper's is bidirectional). Padding: padded keys get
no weight in rho_k (softmax) or are left out with n the sequence's own length (scaling). K/V heads (GQA) keep one
G each, shared by their query heads.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..cost import Cost, Symbols
from ..registry import Op, OpEnv, register
from ._common import AttentionBase, AttentionParams, attention_cost, head_symbols, weightless_shape


class EfficientAttentionParams(AttentionParams):
    norm: Literal["softmax", "scaling"] = Field("softmax", description="rho_q, rho_k: softmax (queries over "
                                                                       "channels, keys over positions) or 1/sqrt(n)")




class EfficientAttention(AttentionBase):
    def __init__(self, p: EfficientAttentionParams, env: OpEnv):
        super().__init__(p, env)
        self.norm = p.norm

    def forward(self, x, ctx):
        q, k, v = self.qkv(x)  # [b, h, n, dh], [b, kv, n, dh]
        mask = ctx.mask if ctx is not None else None  # bool [b, n], False = padding
        if self.norm == "softmax":
            q = q.softmax(-1)
            if mask is not None:
                k = k.masked_fill(~mask[:, None, :, None], float("-inf"))
            k = k.softmax(-2)
        else:
            n = x.shape[1] if mask is None else mask.sum(-1).clamp(min=1)[:, None, None, None].to(q.dtype)
            if mask is not None:
                k = k.masked_fill(~mask[:, None, :, None], 0.0)
            q, k = q / n ** 0.5, k / n ** 0.5
        g = k.transpose(-1, -2) @ v  # [b, kv, dh, dh]
        return self.out(q @ self.expand_kv(g))


def efficient_attention_cost(p: EfficientAttentionParams, env: OpEnv, s: Symbols) -> Cost:
    """G = rho_k(K)^T V per K/V head ([dh, n] @ [n, dh]), then rho_q(Q) G per query head."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    g = b * kv * dh * dh * by
    core = Cost(fwd=2 * b * kv * n * dh * dh + 2 * b * h * n * dh * dh,
                bwd=4 * b * kv * n * dh * dh + 4 * b * h * n * dh * dh,
                fwd_other=5 * (b * h * n * dh + b * kv * n * dh), bwd_other=10 * (b * h * n * dh + b * kv * n * dh))
    saved = q + kvb + kvb + g + q  # rho_q(Q), rho_k(K), v, G, o_proj's copy
    phases = [3 * q + 2 * kvb + g + out]  # at o_proj: rho_q(Q), rho_k(K), v, G, the output and its copy
    # backward: o's gradient beside G's (for every query head); measured besides: with softmax and one K/V head
    # per query head, rho_q's gradient beside q's (2q; with grouped K/V heads the peak stays at the first)
    bwd = [q + g * h / kv] + ([2 * q] if p.norm == "softmax" and kv == h else [])
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=0, bwd_phases=bwd)


OP = register(Op(
    decode=None,  # bidirectional only: G sums every position
    family="mha", variant="efficient", params=EfficientAttentionParams, module=EfficientAttention,
    causal="no", shape=weightless_shape("mha(efficient)"), cost=efficient_attention_cost,
    paper="Efficient Attention: Attention with Linear Complexities, Shen et al. 2018, arXiv:1812.01243",
    summary="rho_q(Q) (rho_k(K)^T V): queries softmaxed over channels, keys over positions, a dh x dh context "
            "per head; O(n dh^2)",
    note="",  # no note in the reference; seed 002 lists it
))
