"""mha(nap): Normalized Attention Pooling, "Normalized Attention Without Probability Cage" (Richter & Wattenhofer
2020, arXiv:2005.09561): the softmax replaced by a normalisation of each query's scores over the keys, per head

    s_ij = q_i . k_j / sqrt(dh),   mu_i = mean_j s_ij,   var_i = mean_j (s_ij - mu_i)^2,
    w_ij = g (s_ij - mu_i) / sqrt(var_i + eps) + b,   o_i = sum_j w_ij v_j,   out = O W_O

with a learned gain g and bias b per head (g = 1, b = 0 at initialisation; the layer-norm form of the note
Softmax/002.md). The weights are not a distribution: they sum to n b, and may be negative. eps = 1e-6 (the paper
leaves it to the implementation). Causal: the statistics of row i are over its past keys j <= i only (mean and
variance of i + 1 scores), and the future gets no weight (not b either): no leak. Padded keys take no part in the
statistics or the sum; a query left with no key (left padding, causal) reads its own (finite, unread). GQA: the
K/V heads serve heads / kv_heads query heads each. The scores and weights are explicit [b, h, n, n] (O(n^2)
bytes, kept for backward): the normalisation needs every score of a row before any weight is known. No position
scheme inside, no dropout. Decoding keeps K and V; the new rows normalise over the keys up to each query.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from ...decode import append_kv
from ..registry import Op, OpEnv, register
from ._common import AttentionBase, AttentionParams
from ._nap_cost import nap_cost
from .isab import no_dropout_shape


class NAPParams(AttentionParams):
    eps: float = Field(1e-6, gt=0.0, le=1.0, description="added to each row's variance")


class NormalizedAttention(AttentionBase):
    def __init__(self, p: NAPParams, env: OpEnv):
        super().__init__(p, env)
        self.eps = p.eps
        self.gain = nn.Parameter(torch.ones(self.heads, 1, 1))
        self.shift = nn.Parameter(torch.zeros(self.heads, 1, 1))

    def forward(self, x, ctx):
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        q, k, v = self.qkv(x)
        keep = self.allowed(ctx, x.shape[1], x.device)  # [b, 1, n, n] with padding, else None
        if keep is None and self.causal:
            keep = self._causal(0, x.shape[1], x.device)
        return self.out(self.attend(q, k, v, keep))

    @staticmethod
    def _causal(p0, T, device):
        """bool [T - p0, T]: query p0 + i reads keys j <= p0 + i."""
        return torch.arange(T, device=device)[None, :] <= torch.arange(p0, T, device=device)[:, None]

    def attend(self, q, k, v, keep):
        """o [b, h, r, dh] for queries q [b, h, r, dh] over keys k, v [b, kv, T, dh]; keep: bool [.., r, T] or None."""
        s = q @ self.expand_kv(k).transpose(-1, -2) * (1.0 / math.sqrt(self.head_dim))
        if keep is None:
            mu = s.mean(-1, keepdim=True)
            c = s - mu
            del s, mu
            var = (c * c).mean(-1, keepdim=True)
            w = c * (self.gain * torch.rsqrt(var + self.eps)) + self.shift
        else:
            count = keep.sum(-1, keepdim=True).to(s.dtype)
            mu = s.masked_fill(~keep, 0.0).sum(-1, keepdim=True) / count
            c = (s - mu).masked_fill(~keep, 0.0)
            del s, mu
            var = (c * c).sum(-1, keepdim=True) / count
            w = c * (self.gain * torch.rsqrt(var + self.eps)) + self.shift * keep
        del c
        return w @ self.expand_kv(v)

    def _step(self, x, ctx):
        """Decoding (causal): the new queries over the cached K, V and their own, each up to its position."""
        p0 = ctx.offset
        q, k, v = self.qkv(x, p0)
        k, v = append_kv(ctx, self, k, v)
        return self.out(self.attend(q, k, v, self._causal(p0, k.shape[2], x.device)))


OP = register(Op(
    decode="K and V of every position (kv_heads heads)",
    family="mha", variant="nap", params=NAPParams, module=NormalizedAttention,
    causal="yes", shape=no_dropout_shape("mha(nap)"), supports=frozenset(), cost=nap_cost,
    paper="Normalized Attention Without Probability Cage, Richter & Wattenhofer 2020, arXiv:2005.09561",
    summary="weights g (s - mean) / std + b of each row of q k^T / sqrt(dh), no softmax; causal: the row's "
            "statistics over its past keys; O(n^2 d)",
    note="Softmax/002.md",
))
