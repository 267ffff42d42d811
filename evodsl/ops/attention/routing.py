"""mha(routing, clusters=k, window=w): the Routing Transformer's content-based sparse attention (Roy, Saffar,
Vaswani, Grangier 2020, Efficient Content-Based Sparse Attention with Routing Transformers, arXiv:2003.05997,
section 4).

Online k-means routes queries and keys to k clusters whose centroids mu_1..mu_k (per head, shared by Q and K, the
buffer `centroids` [h, k, dh], unit vectors drawn once from seed=) live on the unit sphere; q^ = q / |q| and
k^ = k / |k| are routed (no gradient), and attention within a cluster is ordinary softmax attention of q and k:

    c(q_i) = argmax_c q^_i . mu_c,        o_i = sum_{j in K_i} softmax_j(q_i . k_j / sqrt(dh)) v_j

Bidirectional: K_i is the w keys nearest (largest k^ . mu_c) the query's centroid c = c(q_i), the balanced top-w
of the paper's implementation, so every cluster reads exactly w keys (all n where n < w) and the work is n w d; with
k = sqrt(n) clusters of w = n / k keys it is the paper's O(n sqrt(n) d). Queries are routed to their nearest
centroid (each query one cluster; the implementation's top-w queries would leave some without an output).
Causal (our construction; the top-w keys of a cluster depend on later keys, which would leak): K_i is the last w
keys j <= i routed to c(q_i) (c(k_j) = c(q_i)): whether j is read never depends on a later token. A query with no
such key reads its own (its own key is always a slot, at a score penalty of 1e5: its weight is 0 in float64 and
float32 once another key is there). Centroids are fixed within a forward: in training, after the outputs, each
centroid with members moves by the EMA of the mean of its routed q^ and k^ (padding excluded), then is
renormalised:

    mu_c <- normalise(lambda mu_c + (1 - lambda) mean{q^_i, k^_j : c(q_i) = c, c(k_j) = c})     (no gradient)

(the paper's update with the means of lucidrains' implementation); in eval the centroids do not move. Each query's
key slots are gathered ([b, h, n, w + 1] indices: the causal ones from a running count per cluster, no sort) and
read by one F.scaled_dot_product_attention call (queries along its head axis, the slots as keys, an additive mask):
no n x n tensor. Padding: padded keys are never routed nor read and padded tokens take no part in the update, so a
padded batch equals each sequence alone. Decoding (causal) keeps K and V of every position and routes them
again each step. No position scheme inside; dropout= is refused. The cost: _routing_cost.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from ...decode import slot
from ..registry import Op, OpEnv, register
from ._common import AttentionBase, AttentionParams
from ._routing_cost import routing_cost
from .isab import no_dropout_shape

OWN_PENALTY = 1e5  # the own key's score penalty (float16, whose max is 65504: 1e4)


class RoutingParams(AttentionParams):
    clusters: int = Field(4, ge=1, le=1 << 14, description="k: k-means clusters (centroids per head)")
    window: int = Field(64, ge=1, le=1 << 16, description="w: keys a query reads in its cluster")
    decay: float = Field(0.999, ge=0.0, lt=1.0, description="lambda: the centroids' EMA decay in training")
    seed: int = Field(0, ge=0, description="seed of the initial centroids")


def unit(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, dim=-1)


def own_penalty(dtype) -> float:
    return OWN_PENALTY if torch.finfo(dtype).max > 1e6 else 1e4


class RoutingAttention(AttentionBase):
    def __init__(self, p: RoutingParams, env: OpEnv):
        super().__init__(p, env)
        self.clusters, self.window, self.decay = p.clusters, p.window, p.decay
        g = torch.Generator().manual_seed(p.seed)
        self.register_buffer("centroids", unit(torch.randn(self.heads, p.clusters, self.head_dim, generator=g)))

    def forward(self, x, ctx):
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        q, k, v = self.qkv(x)
        k, v = self.expand_kv(k), self.expand_kv(v)
        b, h, n, dh = q.shape
        key_mask = self.key_mask(ctx)
        with torch.no_grad():
            qs, ks = unit(q) @ self.centroids.transpose(-1, -2), unit(k) @ self.centroids.transpose(-1, -2)
            cq = qs.argmax(-1)  # [b, h, n]
            if key_mask is not None:  # padded keys: routed nowhere, never read
                ks = ks.masked_fill(~key_mask[:, None, :, None], float("-inf"))
            idx, ok = self.causal_slots(cq, ks) if self.causal else self.top_slots(cq, ks)
            if key_mask is not None:
                ok = ok & key_mask[:, None, :].expand(b, h, n).gather(-1, idx.flatten(2)).view(ok.shape)
        W = idx.shape[-1]
        own = torch.arange(n, device=x.device).view(1, 1, n, 1).expand(b, h, n, 1)
        slots = torch.cat((idx, own), -1).flatten(2)  # [b, h, n (W + 1)]
        kg = k.gather(2, slots[..., None].expand(b, h, n * (W + 1), dh)).view(b * h, n, W + 1, dh)
        vg = v.gather(2, slots[..., None].expand(b, h, n * (W + 1), dh)).view(b * h, n, W + 1, dh)
        bias = torch.zeros(b, h, n, W + 1, dtype=q.dtype, device=x.device)
        bias[..., :W].masked_fill_(~ok, float("-inf"))
        bias[..., W] = -own_penalty(q.dtype)
        o = F.scaled_dot_product_attention(q.reshape(b * h, n, 1, dh), kg, vg, attn_mask=bias.view(b * h, n, 1, W + 1))
        if self.training:
            self.update(unit(q.detach()), unit(k.detach()), cq, ks.argmax(-1), key_mask)
        return self.out(o.view(b, h, n, dh))

    def top_slots(self, cq, ks):
        """Bidirectional: each query's cluster's top-w keys: indices [b, h, n, w], read where < n (the similarities
        padded with w slots of -inf, so that there are w at every n: no branch on n, one exported graph)."""
        n = ks.shape[2]
        top = F.pad(ks.transpose(-1, -2), (0, self.window), value=float("-inf")).topk(self.window, dim=-1).indices
        idx = top.gather(2, cq[..., None].expand(*cq.shape, self.window))  # [b, h, n, w]
        return idx.clamp(max=n - 1), idx < n

    def causal_slots(self, cq, ks):
        """Causal: the last w keys j <= i of the query's cluster, in the keys sorted by (cluster, position) without a
        sort: slot e - w .. e - 1 with e = the keys of lower clusters + the cluster's keys up to i."""
        b, h, n, k = ks.shape
        ck = ks.argmax(-1)  # [b, h, n]
        member = F.one_hot(ck, k) * torch.isfinite(ks[..., :1]).long()  # padded keys: in no cluster
        upto = member.cumsum(2).gather(3, cq[..., None]).squeeze(-1)  # [b, h, n]: keys of c(q_i) at j <= i
        start = F.pad(member.sum(2).cumsum(-1), (1, 0))[..., :k].gather(2, cq)  # keys of lower clusters
        order = (ck + (1 - member.sum(-1)) * k) * n + torch.arange(n, device=ks.device)  # padded keys last
        perm = order.argsort(-1)  # [b, h, n]: keys by (cluster, position)
        pos = (start + upto)[..., None] - self.window + torch.arange(self.window, device=ks.device)  # [b, h, n, w]
        ok = pos >= start[..., None]
        return perm.gather(2, pos.clamp(0, n - 1).flatten(2)).view(pos.shape), ok

    @torch.no_grad()
    def update(self, qn, kn, cq, ck, key_mask):
        """The centroids' EMA: each cluster with members moves to lambda mu + (1 - lambda) (its members' mean)."""
        keep = torch.ones_like(cq[:, 0], dtype=qn.dtype) if key_mask is None else key_mask.to(qn.dtype)
        oq = F.one_hot(cq, self.clusters).to(qn.dtype) * keep[:, None, :, None]
        ok = F.one_hot(ck, self.clusters).to(qn.dtype) * keep[:, None, :, None]
        total = (oq.transpose(-1, -2) @ qn + ok.transpose(-1, -2) @ kn).sum(0)  # [h, k, dh]
        count = (oq.sum(2) + ok.sum(2)).sum(0)[..., None]  # [h, k, 1]
        moved = unit(self.decay * self.centroids + (1 - self.decay) * total / count.clamp(min=1))
        self.centroids.copy_(torch.where(count > 0, moved, self.centroids))

    def _step(self, x, ctx):
        """Decoding: the cached K and V of every position and these, routed again; each new query reads the last w
        keys j <= i of its cluster (a running count from the end), or its own."""
        q, k, v = self.qkv(x)
        old = ctx.cache.caches.get(slot(ctx, self))
        if old is not None:
            k, v = torch.cat((old[0], k), dim=2), torch.cat((old[1], v), dim=2)
        ctx.cache.caches[slot(ctx, self)] = (k, v)
        k, v = self.expand_kv(k), self.expand_kv(v)
        N, T = k.shape[2], q.shape[2]
        cq = (unit(q) @ self.centroids.transpose(-1, -2)).argmax(-1)  # [b, h, T]
        ck = (unit(k) @ self.centroids.transpose(-1, -2)).argmax(-1)  # [b, h, N]
        i = torch.arange(N - T, N, device=x.device)[:, None]
        j = torch.arange(N, device=x.device)[None, :]
        same = (ck[..., None, :] == cq[..., None]) & (j <= i)  # [b, h, T, N]
        later = same.flip(-1).long().cumsum(-1).flip(-1)  # same-cluster keys at j .. i
        bias = torch.zeros(same.shape, dtype=q.dtype, device=x.device).masked_fill(~(same & (later <= self.window)),
                                                                                  float("-inf"))
        bias = torch.where(j == i, torch.logaddexp(bias, torch.full_like(bias, -own_penalty(q.dtype))), bias)
        return self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=bias))


OP = register(Op(
    decode="K and V of every position (kv_heads heads), routed again each step",
    family="mha", variant="routing", params=RoutingParams, module=RoutingAttention,
    causal="yes", shape=no_dropout_shape("mha(routing)"), supports=frozenset(),
    paper="Efficient Content-Based Sparse Attention with Routing Transformers, Roy et al. 2020, arXiv:2003.05997",
    summary="online k-means (EMA centroids shared by Q and K, unit vectors) routes each query to its nearest "
            "centroid; it reads that cluster's top-w keys (causal: the last w earlier keys routed there); O(n w d), "
            "n sqrt(n) d with k = sqrt(n) clusters of w = n / k",
    note="", cost=routing_cost,
))
