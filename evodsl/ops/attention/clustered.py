"""mha(clustered, clusters=C, bits=B, iterations=L, topk=k): clustered attention (Vyas, Katharopoulos, Fleuret 2020, Fast
Transformers with Clustered Attention, arXiv:2007.04825, section 3.2).

Per batch row and head, the queries are grouped into C clusters, S in {0, 1}^{n x C}; each cluster's centroid
query is the mean of its members, the centroids attend every key, and each query takes its centroid's output:

    q^c_j = sum_i S_ij q_i / sum_i S_ij,    A^c = softmax(Q^c K^T / sqrt(dh)) in R^{C x n},
    O^c = A^c V,    o_i = sum_j S_ij o^c_j                                             O(n C dh) time

The clustering (paper section 3.2.2, as fast-transformers does it): each query is hashed to B bits by random
hyperplanes, c_i = sign(q_i W) in {-1, +1}^B (W [dh, B] Gaussian per head, drawn once from seed=, the buffer
`planes`; sign(0) = +1; no random offsets), then L Lloyd iterations of k-means in Hamming space:

    assign:  a_i = argmin_j hamming(c_i, mu_j) = argmax_j c_i . mu_j  (ties: the lowest j)
    update:  mu_j = sign(sum_{i: a_i = j} c_i)  (the members' bitwise majority, the mean rounded to the cube;
             a tied bit, and every bit of an empty cluster, keeps its value)

and a last assignment gives S. Choices where the paper is silent: the C initial centroids are the codes of the
queries of rank floor(j N / C) among the row's N tokens (deterministic, evenly spread; with N < C some repeat and
the later copies stay empty); clustering sees no gradient (the codes come from q detached); an empty cluster's
centroid query is 0 and no query reads it. The gradient reaches q through the centroid means, as the paper's.
No causal form ("no"): a centroid mixes queries from the whole sequence (the paper runs encoders only).

One dense form, eager and exported: S as a one-hot [b, h, n, C] matrix, the votes S^T codes, the means S^T q and
the outputs S O^c as matmuls, the centroids' attention one F.scaled_dot_product_attention call over [C, n]: no
n x n tensor. Padding: padded tokens take no part (no rank, no vote, no member; their keys masked), so a padded
batch equals each sequence alone, either side; a padded query's output is 0. Grouped K/V heads: the centroids of
a group's query heads read its K/V head. No position scheme inside (a centroid has no position); dropout= is
refused. The cost: _clustered_cost.py.

topk=k > 0: the paper's improved clustered attention (section 3.3, i-clustered): each query of a cluster attends the
k keys of highest centroid attention exactly (its own softmax over them, scaled by the centroid's mass on them) and
the other keys with its centroid's weights; O(n C dh + n k dh): _clustered_topk.py. topk=0 is the form above.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from ..registry import Op, OpEnv, register
from ._clustered_cost import clustered_cost
from ._clustered_topk import improved_clustered
from ._common import AttentionBase, AttentionParams
from .isab import no_dropout_shape


class ClusteredParams(AttentionParams):
    clusters: int = Field(32, ge=1, le=1 << 14, description="C: query clusters per row and head")
    bits: int = Field(32, ge=1, le=1024, description="B: hash bits of each query (random hyperplanes)")
    iterations: int = Field(10, ge=0, le=100, description="L: Lloyd iterations of k-means in Hamming space")
    seed: int = Field(0, ge=0, description="seed of the random hyperplanes")
    topk: int = Field(0, ge=0, le=1 << 14, description="k: keys each cluster's queries attend exactly (improved "
                                                      "clustered attention); 0: the centroid's attention only")


def hash_codes(q: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """q [b, h, n, dh], planes [h, dh, B] -> codes in {-1, +1} [b, h, n, B] (sign(0) = +1)."""
    return torch.where(q @ planes >= 0, 1.0, -1.0).to(q.dtype)


def initial_centroids(codes: torch.Tensor, keep: torch.Tensor, C: int) -> torch.Tensor:
    """The codes [b, h, n, B] of the tokens of rank floor(j N / C), j < C, among each row's N tokens (keep [b, n]
    float, 1 = token) -> [b, h, C, B]."""
    rank = keep.cumsum(-1) - 1  # [b, n]
    N = keep.sum(-1, keepdim=True)  # [b, 1]
    want = torch.div(torch.arange(C, device=codes.device, dtype=keep.dtype) * N, C, rounding_mode="floor")  # [b, C]
    pick = (rank[:, None, :] == want[:, :, None]).to(codes.dtype) * keep[:, None, :]  # [b, C, n]
    return pick[:, None] @ codes


def lloyd(codes: torch.Tensor, keep: torch.Tensor, C: int, iterations: int) -> torch.Tensor:
    """k-means in Hamming space: the one-hot assignment S [b, h, n, C] after `iterations` updates (padded rows 0)."""
    member = keep[:, None, :, None].to(codes.dtype)  # [b, 1, n, 1]
    mu = initial_centroids(codes, keep, C)
    for _ in range(iterations):
        S = F.one_hot((codes @ mu.transpose(-1, -2)).argmax(-1), C).to(codes.dtype) * member
        votes = S.transpose(-1, -2) @ codes  # [b, h, C, B]
        mu = torch.where(votes > 0, 1.0, torch.where(votes < 0, -1.0, mu)).to(codes.dtype)
    return F.one_hot((codes @ mu.transpose(-1, -2)).argmax(-1), C).to(codes.dtype) * member


class ClusteredAttention(AttentionBase):
    def __init__(self, p: ClusteredParams, env: OpEnv):
        super().__init__(p, env)
        self.clusters, self.iterations, self.topk = p.clusters, p.iterations, p.topk
        g = torch.Generator().manual_seed(p.seed)
        self.register_buffer("planes", torch.randn(self.heads, self.head_dim, p.bits, generator=g))

    def forward(self, x, ctx):
        q, k, v = self.qkv(x)
        key_mask = self.key_mask(ctx)
        keep = torch.ones_like(x[..., 0]) if key_mask is None else key_mask.to(x.dtype)
        with torch.no_grad():
            S = lloyd(hash_codes(q, self.planes), keep, self.clusters, self.iterations)  # [b, h, n, C]
        St = S.transpose(-1, -2)
        qc = (St @ q) / St.sum(-1, keepdim=True).clamp_(min=1)  # [b, h, C, dh]: the members' mean
        if self.topk:
            return self.out(improved_clustered(q, k, v, S, qc, keep, self.topk))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        oc = F.scaled_dot_product_attention(qc, k, v, attn_mask=mask, enable_gqa=self.kv_heads != self.heads)
        return self.out(S @ oc)


OP = register(Op(
    family="mha", variant="clustered", params=ClusteredParams, module=ClusteredAttention,
    causal="no", shape=no_dropout_shape("mha(clustered)"), supports=frozenset(), decode=None,
    paper="Fast Transformers with Clustered Attention, Vyas et al. 2020, arXiv:2007.04825",
    summary="queries hashed to B bits (random hyperplanes), L Lloyd iterations of Hamming k-means into C clusters; "
            "the C centroid queries (members' means) attend all keys, each query copies its centroid's output; "
            "O(n C d); topk=k: each query also attends its centroid's top k keys exactly (improved), O(n (C + k) d)",
    note="MHA/SparseOrLowRank/008.md", cost=clustered_cost,
))
