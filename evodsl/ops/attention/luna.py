"""mha(luna, l=L): Luna, linear unified nested attention (Ma et al. 2021), O(n L d).

Pack: L learned vectors P in R^{L x d} (one set per layer) attend the sequence; unpack: the sequence attends the
packed result. Per head i, with q_j, k_j, v_j the projections of position j and p_r the query of P_r:

    A = softmax_j(p_r . k_j / sqrt(dh))  in R^{L x n}                            (pack)
    K~ = A K,  V~ = A V  in R^{L x dh}                                            (the packed context)
    out_j = softmax_r(q_j . K~_r / sqrt(dh)) V~                                   (unpack), then o_proj

That is the paper's Y_P = Attn(P, X), Y_X = Attn(X, Y_P) with the unpack's key and value projections applied
before the pack, where they commute with it (per head: (A X) W = A (X W)), as in its causal form (below), whose
f(Q, K, A^T) and f(A_unpack, A^T, V) read the projected keys and values; the authors' code projects after
packing (5 projections, as here). In the paper P is a second stream carried from layer to layer (P' =
LayerNorm(Y_P + P)); here each layer learns its own P and keeps the packed result to itself, so that its pack
queries P W_q are one free [L, h dh] table, learned as such (p_q; a P read from a stream would need W_q back).
Both steps run as
SDPA (the pack twice, once with K as values, once with V): [L, n] then [n, L] scores per head, never n x n.
Padding: padded keys get no pack weight, so a padded batch equals each sequence alone. K/V heads (GQA): the
pack's query heads read their group's K and V.

Causal (the paper's causal Luna): a softmax over the positions would let a packed vector see the future, so the
pack weights are a positive activation w (elu + 1 or softplus) of each score, and the packed context at t is the
mean over the prefix, f_t(X, Y, Z) = (1/t) x_t sum_{j<=t} y_j^T z_j:

    a_j = w(P_q k_j / sqrt(dh)) in R^L,   K~_t = (1/t) sum_{j<=t} a_j k_j^T,   V~_t = (1/t) sum_{j<=t} a_j v_j^T
    out_t = softmax_r(q_t . K~_t,r / sqrt(dh)) V~_t

computed as two causal linear attentions (_chunked_linear.chunked_plain, chunks of `chunk` tokens, the states
carried chunk to chunk): t K~_t q_t = sum_{j<=t} (q_t . k_j) a_j (query q, key k, value a), then with
w_t = softmax(K~_t q_t / sqrt(dh)), t out_t = sum_{j<=t} (w_t . a_j) v_j (query w_t, key a, value v). O(n C (dh + L)
+ n L dh) time, no n x n and no [n, L, dh] tensor; their states are the two sums sum_j k_j a_j^T and sum_j a_j v_j^T,
which decoding keeps (and reads t from the positions seen). The export (a symbolic n) runs the prefix sums of
a_j k_j^T and a_j v_j^T ([n, L, dh] a head) instead. Left padding: padded positions add nothing to the sums and
are not counted in t.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from typing import Literal

from pydantic import Field
from torch import nn

from ..registry import Op, OpEnv, register
from ...decode import slot
from ._common import AttentionBase, AttentionParams
from ._chunked_linear import chunked_plain
from ._luna_cost import luna_cost
from .isab import no_dropout_shape


ACTIVATIONS = {"elu1": lambda t: F.elu(t) + 1, "softplus": F.softplus}


class LunaParams(AttentionParams):
    l: int = Field(16, ge=1, le=1 << 16, description="L: length of the packed sequence (learned P)")  # noqa: E741
    act: Literal["elu1", "softplus"] = Field("elu1", description="causal form: the pack weights' activation")
    chunk: int = Field(64, ge=1, le=4096, description="causal form: tokens a chunk of its chunked kernel")


class LunaAttention(AttentionBase):
    def __init__(self, p: LunaParams, env: OpEnv):
        super().__init__(p, env)
        self.p_q = nn.Parameter(torch.empty(p.l, self.heads * self.head_dim).normal_(0.0, 1.0))  # P W_q
        self.act, self.chunk = p.act, p.chunk

    def forward(self, x, ctx):
        if self.causal:
            return self._causal(x, ctx)
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
        """K~ = A K and V~ = A V, [b, heads, L, dh]: P's queries (learned, shared by the batch) over the
        sequence's keys, with the keys and then the values as values."""
        b, n, _ = x.shape
        p = self.p_q.view(1, -1, self.heads, self.head_dim).transpose(1, 2).expand(b, -1, -1, -1)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        gqa = self.kv_heads != self.heads
        kp = F.scaled_dot_product_attention(p, k, k, attn_mask=keep, enable_gqa=gqa)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        return kp, F.scaled_dot_product_attention(p, k, v, attn_mask=keep, enable_gqa=gqa)


    def _causal(self, x, ctx):
        """The causal form: two chunked linear attentions (the prefix sums' states carried chunk to chunk, never
        [n, L, dh] a head); decoding (ctx.cache) continues them from the states it keeps."""
        b, n, _ = x.shape
        h, dh = self.heads, self.head_dim
        cache = ctx.cache if ctx is not None else None
        start = ctx.offset if cache is not None else 0
        q, k, v = self.qkv(x)
        k, v = self.expand_kv(k), self.expand_kv(v)
        p = self.p_q.view(-1, h, dh).transpose(0, 1)  # [h, L, dh]
        a = ACTIVATIONS[self.act](k @ p.transpose(-1, -2) * dh ** -0.5)  # [b, h, n, L]
        key_mask = self.key_mask(ctx)
        if key_mask is None:
            t = torch.arange(start + 1, start + n + 1, device=x.device, dtype=x.dtype)[:, None]  # [n, 1]
        else:  # padded positions add nothing and are not counted
            keep = key_mask[:, None, :, None].to(x.dtype)
            a = a * keep
            t = keep.cumsum(2).clamp(min=1)  # [b, 1, n, 1]
        if not isinstance(n, int) or torch.jit.is_tracing():  # a symbolic n (export): the prefix sums themselves
            return self.out(_prefix_sums(q, k, v, a, t, dh))
        old = cache.caches[slot(ctx, self)] if start else (None, None)
        scores, sk = chunked_plain(q, k, a, old[0], self.chunk)  # q_t . sum_{j<=t} k_j a_j^T, [b, h, n, L]
        w = (scores * (dh ** -0.5 / t)).softmax(-1)
        del scores, q, k
        o, sv = chunked_plain(w, a, v, old[1], self.chunk)  # w_t^T sum_{j<=t} a_j v_j^T, [b, h, n, dh]
        if cache is not None:
            # from no state, the states after are views of every chunk's: kept alone
            cache.caches[slot(ctx, self)] = (sk, sv) if start else (sk.clone(), sv.clone())
        del w, a, v
        return self.out(o / t)


def _prefix_sums(q, k, v, a, t, dh):
    """The causal form with [b, h, n, L, dh] prefix sums of a_j k_j^T and a_j v_j^T: the export's (a symbolic n),
    no loop to trace."""
    sk = (a[..., None] * k[..., None, :]).cumsum(2)  # [b, h, n, L, dh]: sum_{j<=t} a_j k_j^T
    w = ((sk @ q[..., None]).squeeze(-1) * (dh ** -0.5 / t)).softmax(-1)  # [b, h, n, L]
    del sk
    sv = (a[..., None] * v[..., None, :]).cumsum(2)
    return (w[..., None, :] @ sv).squeeze(-2) / t


OP = register(Op(
    decode="the two sums sum_j k_j a_j^T [dh x L] and sum_j a_j v_j^T [L x dh] per head: constant in the tokens seen",
    family="mha", variant="luna", params=LunaParams, module=LunaAttention,
    causal="yes", shape=no_dropout_shape("mha(luna)"), cost=luna_cost,
    paper="Luna: Linear Unified Nested Attention, Ma et al. 2021, arXiv:2106.01540",
    summary="pack A = softmax(P_q K^T / sqrt(dh)) (L x n), unpack softmax(Q (A K)^T / sqrt(dh)) (A V); P in "
            "R^{L x d} learned per layer; O(n L d)",
    note="MHA/SparseOrLowRank/011.md",
))
