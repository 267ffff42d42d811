"""mha(smyrf, clusters=C, rounds=R): SMYRF, asymmetric LSH with balanced clusters (Daras, Kitaev, Odena,
Dimakis 2020, SMYRF: Efficient Attention using Asymmetric Clustering, arXiv:2010.05315, section 3).

Per batch row, head and round, the XBOX+ transformations turn the maximum inner product into a nearest neighbour:

    F(q) = [q; 0; sqrt(M^2 - |q|^2)],   G(k) = [k; sqrt(M^2 - |k|^2); 0],   M^2 = max_i |q_i|^2 + max_j |k_j|^2

so |F(q)| = |G(k)| = M and |F(q) - G(k)|^2 = 2 M^2 - 2 q.k. Each is hashed by E2LSH, h(x) = floor((a.x + b) / r)
with a ~ N(0, I_{dh+2}) (one per head and round, drawn once from seed=: the buffer `alpha` [h, dh+2, R]); queries
and keys are each sorted by their hash and cut, in that order, into C clusters of equal size, the c-th query
cluster attending the c-th key cluster:

    o_r(i) = sum_{j in K_c(r)} softmax_j(q_i.k_j / sqrt(dh)) v_j,   L_r(i) = logsumexp_{j in K_c(r)} q_i.k_j / sqrt(dh)
    o_i = sum_r exp(L_r(i) - logsumexp_r' L_r'(i)) o_r(i)                         (i in query cluster c of round r)

Choices where the paper is silent, or as the authors' code: the sort is by the projection a.x itself, unfloored,
as the authors' code sorts (the floor is monotone and b, r are the same for every token of a round: sorting by
the floored hash, its ties broken by the projection, is the same order; so b and r change nothing and are left out);
n not a multiple of C: cluster c holds the sorted places floor(c N / C) .. floor((c+1) N / C) - 1 of the row's N
tokens (sizes differ by at most one; the paper pads to a multiple), laid out as C slots of L = ceil(n / C) + 1
(one slot always masked: never 1, a size torch.export would specialize) with the places past a cluster's end masked; C > N leaves some clusters empty, their slots unread. M is taken per row
and head over the row's tokens, q per query head and k per its K/V head (grouped heads: each query head sorts
the keys of its K/V head); hashing sees no gradient; rounds combine without the duplicate-count correction (as
the authors' default). The softmax is explicit, not F.scaled_dot_product_attention: combining rounds needs each
round's logsumexp, which SDPA does not give; one round (R = 1) runs F.scaled_dot_product_attention over the
clusters (a [b, h C, L, dh] batch, the mask [h C, 1, L]).

No causal form ("no"): a token's cluster depends on every token of the sequence (the sort, and M). Time: the
sort O(R n log n), the attention O(R n L dh) = O(R n^2 dh / C), quadratic for a fixed C (an n/C-th of
softmax's scores); no n x n tensor, [n, L] scores per round. Padding: padded tokens are sorted after every token
and left out of M and of the cut, so a padded batch equals each sequence alone, either side. No position scheme
inside; dropout= is refused. The cost: _smyrf_cost.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from ..registry import Op, OpEnv, register
from ._common import AttentionBase, AttentionParams
from ._smyrf_cost import smyrf_cost
from .isab import no_dropout_shape
from .lsh import combine_rounds


class SmyrfParams(AttentionParams):
    clusters: int = Field(8, ge=1, le=1 << 14, description="C: balanced query and key clusters per round")
    rounds: int = Field(1, ge=1, le=64, description="R: hashing rounds, combined by their logsumexp")
    seed: int = Field(0, ge=0, description="seed of the E2LSH projections")


def xbox_plus(q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor | None):
    """q, k [b, h, n, dh] -> F(q), G(k) [b, h, n, dh + 2]; M^2 = max |q|^2 + max |k|^2 over the row's tokens (keep
    [b, n] bool, or None: all)."""
    nq, nk = q.pow(2).sum(-1, keepdim=True), k.pow(2).sum(-1, keepdim=True)
    mq, mk = nq, nk
    if keep is not None:  # padded tokens left out of M (norms are >= 0: a 0 changes no max)
        mq, mk = nq * keep[:, None, :, None], nk * keep[:, None, :, None]
    M2 = mq.amax(-2, keepdim=True) + mk.amax(-2, keepdim=True)
    zero = torch.zeros_like(nq)
    return (torch.cat((q, zero, (M2 - nq).clamp_min(0).sqrt()), -1),
            torch.cat((k, (M2 - nk).clamp_min(0).sqrt(), zero), -1))


def cluster_length(n, C: int):
    """L = ceil(n / C) + 1 slots a cluster, the last always masked: a floor torch.export can reason with, and never
    1, a size it would specialize (max(ceil(n / C), 2) leaves guards it cannot prove)."""
    return (n + 2 * C - 1) // C


def cluster_slots(N: torch.Tensor, n, C: int, device):
    """N [B, 1] tokens a row -> (src [B, C L], the sorted place each slot reads, clamped below n; valid [B, C, 1, L],
    the slot holds a place of its cluster or is its first slot; pos [B, n], each sorted place's slot)."""
    L = cluster_length(n, C)
    c = torch.arange(C, device=device)
    start = torch.div(c * N, C, rounding_mode="floor")  # [B, C]
    end = torch.div((c + 1) * N, C, rounding_mode="floor")
    j = torch.arange(L, device=device)
    place = start[..., None] + j  # [B, C, L]
    valid = (place < end[..., None]) | (j == 0)  # an empty cluster's first slot: a finite row nobody reads
    p = torch.arange(n, device=device)
    cl = torch.div((p + 1) * C - 1, N, rounding_mode="floor").clamp(max=C - 1)  # [B, n]: place p's cluster
    jj = (p - start.gather(1, cl)).clamp(max=L - 1)  # places past N (padding): clamped, never read
    return place.clamp(max=n - 1).flatten(1), valid.unsqueeze(2), cl * L + jj


def smyrf_orders(q, k, alpha, keep):
    """q, k [b, h, n, dh], alpha [h, dh + 2, R] -> the sorted order of the queries and of the keys by their E2LSH
    projections a.F(q), a.G(k), [b, h, R, n] each (padded tokens last)."""
    fq, gk = xbox_plus(q, k, keep)
    hq, hk = (t @ alpha for t in (fq, gk))  # [b, h, n, R]
    if keep is not None:
        hq, hk = (t.masked_fill(~keep[:, None, :, None], math.inf) for t in (hq, hk))
    return hq.transpose(2, 3).argsort(-1), hk.transpose(2, 3).argsort(-1)


class SmyrfAttention(AttentionBase):
    def __init__(self, p: SmyrfParams, env: OpEnv):
        super().__init__(p, env)
        self.clusters, self.rounds = p.clusters, p.rounds
        g = torch.Generator().manual_seed(p.seed)
        self.register_buffer("alpha", torch.randn(self.heads, self.head_dim + 2, p.rounds, generator=g))

    def forward(self, x, ctx):
        q, k, v = self.qkv(x)
        k, v = self.expand_kv(k), self.expand_kv(v)
        keep = self.key_mask(ctx)
        o, lse = self.attend(q, k, v, keep)
        return self.out(o[:, :, 0] if lse is None else combine_rounds(o, lse))

    def attend(self, q, k, v, keep):
        """q, k, v [b, h, n, dh] (K/V repeated to the query heads) -> each round's outputs [b, h, R, n, dh] and
        logsumexps [b, h, R, n] at the original positions (one round: None, F.scaled_dot_product_attention's
        fused kernel over the clusters, as no logsumexp is needed)."""
        b, h, n, dh = q.shape
        R, C, dev = self.rounds, self.clusters, q.device
        with torch.no_grad():
            perm_q, perm_k = smyrf_orders(q.detach(), k.detach(), self.alpha, keep)
        N = (keep if keep is not None else torch.ones(1, n, dtype=torch.bool, device=dev)).sum(-1, keepdim=True)
        src, valid, pos = cluster_slots(N.clamp(min=1), n, C, dev)
        L = cluster_length(n, C)
        shape = (b, h, R, src.shape[-1])
        sq, sk = (perm.gather(3, src[:, None, None, :].expand(shape)) for perm in (perm_q, perm_k))

        def sort(t, idx):  # t [b, h, n, dh] -> [b, h, R, C, L, dh], the tokens of each cluster's slots
            return t[:, :, None].expand(b, h, R, n, dh).gather(3, idx[..., None].expand(*shape, dh)).unflatten(3, (C, L))

        inv = torch.empty_like(perm_q).scatter_(3, perm_q, torch.arange(n, device=dev).expand_as(perm_q))
        rows = pos[:, None, None, :].expand(b, h, R, n).gather(3, inv)  # each token's slot
        if R == 1:
            mask = valid[:, None].expand(valid.shape[0], h, C, 1, L).flatten(1, 2)  # [B, h C, 1, L]
            o = F.scaled_dot_product_attention(*(sort(t, i).flatten(1, 3) for t, i in ((q, sq), (k, sk), (v, sk))),
                                               attn_mask=mask)  # [b, h C, L, dh]
            return o.reshape(b, h, 1, C * L, dh).gather(3, rows[..., None].expand(b, h, 1, n, dh)), None
        s = (sort(q, sq) * dh ** -0.5) @ sort(k, sk).transpose(-1, -2)  # [b, h, R, C, L, L]
        s = s.masked_fill(~valid[:, None, None], float("-inf"))
        top = s.detach().amax(-1, keepdim=True)
        lse = top + (s - top).exp().sum(-1, keepdim=True).log()  # written out: onnxruntime's as lsh.py's
        o = s.softmax(-1) @ sort(v, sk)  # [b, h, R, C, L, dh]
        return (o.flatten(3, 4).gather(3, rows[..., None].expand(b, h, R, n, dh)),
                lse.flatten(3, 5).gather(3, rows))


OP = register(Op(
    family="mha", variant="smyrf", params=SmyrfParams, module=SmyrfAttention,
    causal="no", shape=no_dropout_shape("mha(smyrf)"), supports=frozenset(), decode=None,
    paper="SMYRF: Efficient Attention using Asymmetric Clustering, Daras et al. 2020, arXiv:2010.05315",
    summary="XBOX+ F(q) = [q; 0; sqrt(M^2 - |q|^2)], G(k) = [k; sqrt(M^2 - |k|^2); 0] turn max inner product into "
            "nearest neighbour; E2LSH, queries and keys sorted and cut into C balanced clusters, softmax within "
            "each; R rounds combined by logsumexp; O(R n log n + R n^2 d / C)",
    note="", cost=smyrf_cost,
))
