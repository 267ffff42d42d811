"""mha(ufo, kv_axis=key): UFO-ViT's attention without softmax (Song 2021), per head

    o = XN(Q) XN(K^T V),     XN(x) = gamma x / ||x||_2       (XNorm: an l2 norm with a learned scale)

with Q normalised over the dh channels of each query and the [dh x dh] context G = K^T V over its key-channel
axis (kv_axis=key: each column G[:, e] a unit vector, so o_ie = gamma^2 cos(q_i, G[:, e]), the reference note's
XN_{axis=0}(K^T V)), or over its value axis (kv_axis=value: each row G[c, :], as the widely copied unofficial
code External-Attention-pytorch/UFOAttention.py does with norm(..., dim=-1)). gamma is learned per head and
used in both XNorms, as those codes do (o scaled by gamma^2); it starts at 1. O(n dh^2), never n x n; no
softmax, no 1/sqrt(dh), no 1/n.

No causal form: XN(G) normalises the sum over all keys; a causal one would normalise each query's own prefix
sum G_i = sum_{j <= i} k_j v_j^T, a data-dependent normalisation of a per-position [dh x dh] state that the
paper (an image model) does not define. Padding: padded keys add nothing to G (XN needs no count), so a padded
batch equals each sequence alone. K/V heads (GQA) each keep one G. No position scheme (none in the paper).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..cost import Cost, Symbols
from ..registry import Op, OpEnv, register
from ._common import AttentionBase, AttentionParams, attention_cost, head_symbols, weightless_shape


class UFOParams(AttentionParams):
    kv_axis: Literal["key", "value"] = Field("key", description="the axis of K^T V that XNorm normalises: key "
                                                                "(each column, the note's) or value (each row)")


class UFOAttention(AttentionBase):
    def __init__(self, p: UFOParams, env: OpEnv):
        super().__init__(p, env)
        self.kv_dim = -2 if p.kv_axis == "key" else -1
        self.gamma = nn.Parameter(torch.ones(self.heads))  # XNorm's scale, per head

    def forward(self, x, ctx=None):
        q, k, v = self.qkv(x)  # [b, h, n, dh], [b, kv, n, dh]
        key_mask = self.key_mask(ctx)
        if key_mask is not None:  # padded keys add nothing to K^T V
            k = k * key_mask[:, None, :, None].to(k.dtype)
        g = F.normalize(k.transpose(-1, -2) @ v, dim=self.kv_dim)  # [b, kv, dh, dh]
        # both XNorms' gamma on G, repeated to the query heads (it is small): o = XN(q) (gamma^2 G^)
        g = self.expand_kv(g) * self.gamma.square()[:, None, None]
        return self.out(F.normalize(q, dim=-1) @ g)


def ufo_cost(p: UFOParams, env: OpEnv, s: Symbols) -> Cost:
    """G = K^T V per K/V head ([dh, n] @ [n, dh]), then XN(Q) G^ per query head; the norms are O(n dh)."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    g, g_kv = b * h * dh * dh * by, b * kv * dh * dh * by  # G at the query heads, and per K/V head
    fwd = 2 * b * kv * n * dh ** 2 + 2 * b * h * n * dh ** 2
    other = 3 * b * h * n * dh + 3 * b * kv * dh ** 2 + b * h * dh ** 2
    core = Cost(params=h, fwd=fwd, bwd=2 * fwd, fwd_other=other, bwd_other=2 * other)
    # kept: q and its two norms (F.normalize), XN(q); k and v; G and its two norms; XN(G) at the query heads
    # and gamma^2 G^ (the matmul's); gamma^2; o_proj's copy
    saved = q + 2 * b * h * n * by + q + 2 * kvb + g_kv + 2 * b * kv * dh * by + 2 * g + h * by + q
    phases = [q + 2 * kvb + g + q + q + out]  # at o_proj: q, k, v, gamma^2 G^, XN(q), the output and its copy
    bwd = [3 * q]
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=0, bwd_phases=bwd)


OP = register(Op(
    decode=None,  # bidirectional only: XN(K^T V) normalises the sum over every position
    family="mha", variant="ufo", params=UFOParams, module=UFOAttention,
    causal="no", shape=weightless_shape("mha(ufo)"), cost=ufo_cost,
    paper="UFO-ViT: High Performance Linear Vision Transformer without Softmax, Song 2021, arXiv:2109.14382",
    summary="XN(Q) XN(K^T V), XN(x) = gamma x / ||x||_2 (q over channels; K^T V over its key or value axis), "
            "gamma per head; no softmax; O(n dh^2)",
    note="MHA/RightProduct/005.md",
))
