"""mha(scatterbrain, features=m, clusters=C, window=w): Scatterbrain, sparse + low-rank attention (Chen, Dao, Winsor, Song,
Rudra, Re 2021, Scatterbrain: Unifying Sparse and Low-rank Attention Approximation, arXiv:2110.15343, section 4).

The attention matrix exp(Q K^T / sqrt(dh)) is estimated by a low-rank part, Performer's positive random features
phi (FAVOR+, performer.py: phi(x) = exp(w_i^T x' - |x'|^2 / 2) / sqrt(m), x' = x / dh^{1/4}, E[phi(q).phi(k)] =
exp(q.k / sqrt(dh))), plus a sparse correction S on a support Omega that holds the exact value there:

    S_ij = exp(q_i.k_j / sqrt(dh)) - phi(q_i).phi(k_j)  for (i, j) in Omega, else 0
    o_i = (sum_j S_ij v_j + phi(q_i)^T sum_j phi(k_j) v_j^T) / (sum_j S_ij + phi(q_i)^T sum_j phi(k_j))

so the estimate is exact on Omega and Performer's elsewhere (unbiased: the paper's section 4.1). The support is
LSH's, as the paper's drop-in experiments (BigGAN, T2T-ViT: its SMYRF + Performer form): one SMYRF hashing round
(smyrf.py: XBOX+ transforms, E2LSH, queries and keys sorted and cut into C balanced clusters), query i's cluster
reads its key cluster. Omega = all pairs (C = 1) gives softmax attention exactly. The denominator is positive:
it is sum_{j in Omega} exp(.) + sum_{j not in Omega} phi(q_i).phi(k_j).

Choices where the paper is silent, or as the authors' code (HazyResearch/fly, SBSmyrfAttention): one hashing
round (no duplicate counting); the random features drawn once from seed= (the buffer `w` [m, dh], blocks of
orthogonal rows as performer.py, shared by the heads) with the E2LSH projections (`alpha`); the scale
1/sqrt(dh). Stabilised as performer.py: each query's feature logits lose their max c_q, the keys' the max c_k
over the sequence (per K/V head, padded keys left out), and each query's sparse and low-rank terms are scaled by
exp(-c), c = max(max_{j in Omega} q.k / sqrt(dh), c_q + c_k): one constant per query in the numerator and the
denominator (detached), so the output is exactly the equation's.

The causal form swaps the support: LSH clusters depend on every token (a causal mask inside them still leaks
through the sort), so causal models use the local window, query i reading keys i - w + 1 .. i, as the authors'
causal SBLocalAttention, with the low-rank sums over j <= i (Performer's prefix sums, _kernelized.causal):
_scatterbrain_local.py, with its decoding state (the last w - 1 keys and values, the running sums and scale).
A query with no key (a padded position before every token) gets 0. Time: the clusters' O(n L (dh + m)) scores
and feature products, L = ceil(n / C) + 1 (quadratic for a fixed C), or the window's O(n w (dh + m)); the
low-rank O(n m dh); no n x n tensor. Padding: padded tokens are out of the clusters (smyrf.py) or the window and
their features 0, so a padded batch equals each sequence alone, either side. No position scheme; dropout= is
refused. The cost: _scatterbrain_cost.py.
"""
from __future__ import annotations

import torch
from pydantic import Field

from ..registry import Op, OpEnv, register
from . import _kernelized as kern
from ._common import AttentionBase, AttentionParams
from ._scatterbrain_cost import scatterbrain_cost
from ._scatterbrain_local import local_step, window_correction
from .isab import no_dropout_shape
from .performer import favor_logits, orthogonal_gaussian
from .smyrf import cluster_length, cluster_slots, smyrf_orders


class ScatterbrainParams(AttentionParams):
    features: int = Field(64, ge=1, le=1 << 16, description="m: random features per head (the low-rank part)")
    clusters: int = Field(8, ge=1, le=1 << 14, description="C: balanced LSH clusters (the sparse part's support)")
    window: int = Field(64, ge=1, le=1 << 16, description="w: the causal form's support, keys i - w + 1 .. i")
    seed: int = Field(0, ge=0, description="seed of the random features and the E2LSH projections")


class ScatterbrainAttention(AttentionBase):
    def __init__(self, p: ScatterbrainParams, env: OpEnv):
        super().__init__(p, env)
        self.clusters, self.window, self.chunk = p.clusters, p.window, 64  # chunk: the causal prefix sums'
        g = torch.Generator().manual_seed(p.seed)
        self.register_buffer("alpha", torch.randn(self.heads, self.head_dim + 2, 1, generator=g))
        self.register_buffer("w", orthogonal_gaussian(p.features, self.head_dim, g).to(torch.get_default_dtype()))

    def forward(self, x, ctx):
        if ctx is not None and ctx.cache is not None:
            return local_step(self, x, ctx)
        q, k, v = self.qkv(x)
        keep = self.key_mask(ctx)
        uq, uk = favor_logits(q, self.w), favor_logits(k, self.w)
        if keep is not None:  # padded keys: phi(k) = 0
            uk.masked_fill_(~keep[:, None, :, None], float("-inf"))
        cq, ck = uq.detach().amax(-1, keepdim=True), uk.detach().amax((-2, -1), keepdim=True)  # [b, h, n, 1], [b, kv, 1, 1]
        fq, fk = uq.sub_(cq).exp_(), uk.sub_(ck).exp_()  # in place: the logits are not kept
        del uq, uk
        cqk = cq + self.expand_kv(ck)  # log of the features' constant, per query
        if self.causal:  # the local window's correction; the prefix sums [S_i z_i] (_kernelized.causal)
            low = kern.causal(fq, self.expand_kv(fk), self.expand_kv(v), self.chunk)
            sparse, c = window_correction(q, self.expand_kv(k), self.expand_kv(v), fq, self.expand_kv(fk), cqk,
                                          self.window, keep)
        else:
            low = kern.bidirectional(fq, fk, v, self.expand_kv)  # [b, h, n, dh + 1]: phi~(q)^T [S z]
            sparse, c = self.sparse(q, self.expand_kv(k), self.expand_kv(v), fq, self.expand_kv(fk), cqk, keep)
        o = sparse + low * (cqk - c).exp()
        if self.causal:  # a padded position before every token reads no key: 0, finite
            return self.out(o[..., :-1] / o[..., -1:].clamp_min(torch.finfo(o.dtype).tiny))
        return self.out(o[..., :-1] / o[..., -1:])

    def sparse(self, q, k, v, fq, fk, cqk, keep):
        """The correction on the clusters: q, k, v [b, h, n, dh], the scaled features fq, fk [b, h, n, m], their
        log constant cqk [b, h, n, 1] -> (sum_j S_ij [v_j 1] exp(-c_i) [b, h, n, dh + 1], c [b, h, n, 1])."""
        b, h, n, dh = q.shape
        C, dev = self.clusters, q.device
        with torch.no_grad():
            perm_q, perm_k = smyrf_orders(q.detach(), k.detach(), self.alpha, keep)  # [b, h, 1, n]
        N = (keep if keep is not None else torch.ones(1, n, dtype=torch.bool, device=dev)).sum(-1, keepdim=True)
        src, valid, pos = cluster_slots(N.clamp(min=1), n, C, dev)
        L = cluster_length(n, C)
        shape = (b, h, src.shape[-1])
        sq, sk = (perm[:, :, 0].gather(2, src[:, None, :].expand(shape)) for perm in (perm_q, perm_k))

        def sort(t, idx):  # t [b, h, n, f] -> [b, h, C, L, f], the tokens of each cluster's slots
            return t.gather(2, idx[..., None].expand(*shape, t.shape[-1])).unflatten(2, (C, L))

        s = (sort(q, sq) * dh ** -0.5) @ sort(k, sk).transpose(-1, -2)  # [b, h, C, L, L]
        s = s.masked_fill(~valid[:, None], float("-inf"))
        cs = sort(cqk, sq)  # [b, h, C, L, 1]
        c = torch.maximum(s.detach().amax(-1, keepdim=True), cs)
        dots = (sort(fq, sq) @ sort(fk, sk).transpose(-1, -2)).masked_fill(~valid[:, None], 0.0)
        S = (s - c).exp() - dots * (cs - c).exp()
        o = S @ kern.ones_column(sort(v, sk))  # [b, h, C, L, dh + 1]
        inv = torch.empty_like(perm_q[:, :, 0]).scatter_(2, perm_q[:, :, 0], torch.arange(n, device=dev).expand(b, h, n))
        rows = pos[:, None, :].expand(b, h, n).gather(2, inv)  # each token's slot
        return (o.flatten(2, 3).gather(2, rows[..., None].expand(b, h, n, dh + 1)),
                c.flatten(2, 3).gather(2, rows[..., None]))


OP = register(Op(
    family="mha", variant="scatterbrain", params=ScatterbrainParams, module=ScatterbrainAttention,
    causal="yes", shape=no_dropout_shape("mha(scatterbrain)"), supports=frozenset(),
    decode="the last w - 1 keys and values (kv_heads heads), the running sums of phi(k) [v 1] and their scale",
    paper="Scatterbrain: Unifying Sparse and Low-rank Attention Approximation, Chen et al. 2021, arXiv:2110.15343",
    summary="(S + phi(Q) phi(K)^T) [V 1], normalised: Performer's positive features phi plus a sparse S = exp(QK^T/"
            "sqrt(dh)) - phi(Q) phi(K)^T on one SMYRF round's C balanced LSH clusters; exact there, Performer "
            "elsewhere; causal: S on the window i-w+1..i, prefix sums; O(n (n/C) (d + m) + n m d), causal O(n w (d + m))",
    note="MHA/SparseOrLowRank/002.md", cost=scatterbrain_cost,
))
