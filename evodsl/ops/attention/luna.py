"""mha(luna, l=L): Luna, linear unified nested attention (Ma et al. 2021), O(n L d).

Pack: L learned vectors P in R^{L x d} (one set per layer) attend the sequence; unpack: the sequence attends the
packed result. Per head i, with q_j, k_j, v_j the projections of position j and p_r the query projection of P_r:

    A = softmax_j(p_r . k_j / sqrt(dh))  in R^{L x n}                            (pack)
    K~ = A K,  V~ = A V  in R^{L x dh}                                            (the packed context)
    out_j = softmax_r(q_j . K~_r / sqrt(dh)) V~                                   (unpack), then o_proj

That is the paper's Y_P = Attn(P, X), Y_X = Attn(X, Y_P) with the unpack's key and value projections applied
before the pack, where they commute with it (per head: (A X) W = A (X W)), as in its causal form (below), whose
f(Q, K, A^T) and f(A_unpack, A^T, V) read the projected keys and values; the authors' code projects after
packing (5 projections, as here). In the paper P is a second stream carried from layer to layer (P' =
LayerNorm(Y_P + P)); here each layer learns its own P and keeps the packed result to itself. Both steps run as
SDPA (the pack twice, once with K as values, once with V): [L, n] then [n, L] scores per head, never n x n.
Padding: padded keys get no pack weight, so a padded batch equals each sequence alone. K/V heads (GQA): the
pack's query heads read their group's K and V.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..cost import Cost, Symbols, linear
from ..registry import Op, OpEnv, register
from ._common import LSE_BYTES, AttentionBase, AttentionParams, attention_cost, head_symbols
from .isab import no_dropout_shape


class LunaParams(AttentionParams):
    l: int = Field(16, ge=1, le=1 << 16, description="L: length of the packed sequence (learned P)")  # noqa: E741


class LunaAttention(AttentionBase):
    def __init__(self, p: LunaParams, env: OpEnv):
        super().__init__(p, env)
        d = env.d
        self.packed = nn.Parameter(torch.empty(p.l, d).normal_(0.0, d ** -0.5))  # P
        self.p_proj = nn.Linear(d, self.heads * self.head_dim, bias=p.bias)

    def forward(self, x, ctx):
        mask = self.key_mask(ctx)
        keep = None if mask is None else mask[:, None, None, :]
        if keep is not None:
            keep = keep | ~keep.any(-1, keepdim=True)  # a row with no token reads all: finite, read by no one
        kp, vp = self._pack(x, keep)
        o = F.scaled_dot_product_attention(self.q_proj(x).view(*x.shape[:2], self.heads, self.head_dim).transpose(1, 2),
                                           kp, vp)
        del kp, vp
        return self.out(o)

    def _pack(self, x, keep):
        """K~ = A K and V~ = A V, [b, heads, L, dh]: P's queries (one projection, shared by the batch) over the
        sequence's keys, with the keys and then the values as values."""
        b, n, _ = x.shape
        p = self.p_proj(self.packed).view(1, -1, self.heads, self.head_dim).transpose(1, 2).expand(b, -1, -1, -1)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        gqa = self.kv_heads != self.heads
        kp = F.scaled_dot_product_attention(p, k, k, attn_mask=keep, enable_gqa=gqa)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        return kp, F.scaled_dot_product_attention(p, k, v, attn_mask=keep, enable_gqa=gqa)


def luna_cost(p: LunaParams, env: OpEnv, s: Symbols) -> Cost:
    """The projections, P's query projection (once, not per sequence), the pack as two SDPA calls over
    [b, h, L, n] scores, the unpack as one over [b, h, n, L]."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    L = s.sym("L", p.l)
    pq = linear(s, s.d, h * dh, p.bias, tokens=L)
    scores = b * h * L * n
    core = Cost(params=pq.params + L * s.d, fwd=pq.fwd + 12 * scores * dh, bwd=pq.bwd + 30 * scores * dh,
                fwd_other=15 * scores, bwd_other=pq.bwd_other + 30 * scores)
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    pb, cb = L * h * dh * by, b * L * h * dh * by  # P's queries (one copy); K~ or V~
    lse_l, lse_n = LSE_BYTES * b * h * L, LSE_BYTES * b * h * n
    saved = pb + 2 * kvb + 2 * (cb + lse_l) + q + q + lse_n  # the unpack: q, K~, V~ (kept), its output, lse
    phases = [pb + 2 * kvb + 2 * cb + lse_l,  # the second pack
              q + 2 * cb + q + lse_n,  # the unpack
              q + out]  # at o_proj
    # backward: the unpack's gradients beside o's; the second pack's (P's queries, k's, v's) beside K~'s and the
    # input's, the unpack's saved tensors released; then the input's from v_proj, summed, beside k's and K~'s,
    # the second pack's saved tensors released too
    late = 2 * q + lse_n
    bwd = [2 * q + 2 * cb, out + 3 * cb + 2 * kvb - late, 3 * out + cb + kvb - (late + kvb + cb + lse_l)]
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=0, bwd_phases=bwd)


OP = register(Op(
    decode=None,  # bidirectional only: the pack reads every position
    family="mha", variant="luna", params=LunaParams, module=LunaAttention,
    causal="no", shape=no_dropout_shape("mha(luna)"), cost=luna_cost,
    paper="Luna: Linear Unified Nested Attention, Ma et al. 2021, arXiv:2106.01540",
    summary="pack A = softmax(P_q K^T / sqrt(dh)) (L x n), unpack softmax(Q (A K)^T / sqrt(dh)) (A V); P in "
            "R^{L x d} learned per layer; O(n L d)",
    note="MHA/SparseOrLowRank/011.md",
))
