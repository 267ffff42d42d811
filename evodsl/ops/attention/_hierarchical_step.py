"""Decoding mha(hierarchical) (causal), token by token (hierarchical.py's equation, read from a bounded state).

Token t reads, at level 0, the raw keys of its block up to itself and of the block before; at each level l >= 1
whose block index a_l = floor(t / (Nr 2^l)) is at least 1, the Nr clusters of block a_l - 1 (their first half
only when t's cluster is in the first half of its block), with the query of its level-l cluster's first token.
All of its weights share one softmax: exp(q_l . k~) times the cluster's size, over the levels' keys together.

The state, per level l: the key and value sums and token counts of the clusters from block a_l - 2 on (at most
3 Nr), the index of the first kept cluster, and the query of the current cluster's first token. Level l starts at
t = Nr 2^l, from the pairs of level l - 1's first 2 Nr clusters (still kept then: level l - 1 is at its block 2).
"""
from __future__ import annotations

import math

import torch

from ...decode import slot


class Level:
    """One level's state: its clusters' key and value sums [b, kv, E, dh] and sizes (ints), from cluster `base`
    on, and the query of the current cluster's first token [b, h, dh] (level 0: none, it is the token's own)."""

    def __init__(self, ks, vs, cnt: list, base: int, q):
        self.ks, self.vs, self.cnt, self.base, self.q = ks, vs, cnt, base, q

    def __iter__(self):  # the tensors it holds (DecodeState.nbytes)
        return iter(t for t in (self.ks, self.vs, self.q) if t is not None)

    def add(self, r: int, k, v, Nr: int):
        """Token sums k, v [b, kv, dh] into cluster r (a new one past the last), then the clusters before block
        floor(r / Nr) - 2 dropped."""
        if r == self.base + len(self.cnt) - 1:
            self.ks[:, :, -1] += k
            self.vs[:, :, -1] += v
            self.cnt[-1] += 1
        else:
            self.ks = torch.cat((self.ks, k[:, :, None]), dim=2)
            self.vs = torch.cat((self.vs, v[:, :, None]), dim=2)
            self.cnt.append(1)
        keep = max(0, (r // Nr - 2) * Nr)
        if keep > self.base:  # copies: a view would keep the dropped clusters' storage
            cut = keep - self.base
            self.ks, self.vs = self.ks[:, :, cut:].clone(), self.vs[:, :, cut:].clone()
            self.cnt, self.base = self.cnt[cut:], keep

    def coarser(self, Nr: int, q) -> "Level":
        """Level l + 1's first block, from this level's clusters 0 .. 2 Nr - 1 (this level at its block 2)."""
        assert self.base == 0
        ks, vs, cnt = self.ks[:, :, :2 * Nr], self.vs[:, :, :2 * Nr], self.cnt[:2 * Nr]
        return Level(ks.unflatten(2, (Nr, 2)).sum(3), vs.unflatten(2, (Nr, 2)).sum(3),
                     [cnt[2 * i] + cnt[2 * i + 1] for i in range(Nr)], 0, q)


class State:
    """The levels of one attention's state; iterating it gives the tensors held (DecodeState.nbytes)."""

    def __init__(self, levels: list):
        self.levels = levels

    def __iter__(self):
        return iter([t for lev in self.levels for t in lev])


def token(m, levels: list, t: int, q, k, v):
    """Token t (q [b, h, dh] scaled, k, v [b, kv, dh]) into the state; its output [b, h, dh]."""
    Nr = m.block
    for l, lev in enumerate(levels):
        if l and t % (1 << l) == 0:
            lev.q = q.clone()  # a copy: a view would keep the whole chunk of queries
        lev.add(t >> l, k, v, Nr)
    if t == Nr << len(levels):  # a level's first read: build it from the one below
        levels.append(levels[-1].coarser(Nr, q.clone()))
        levels[-1].add(t >> (len(levels) - 1), k, v, Nr)
    scores, values = [], []
    for l, lev in enumerate(levels):
        r = t >> l
        a = r // Nr
        if l == 0:
            lo, hi = max(0, (a - 1) * Nr), r + 1
        elif a >= 1:
            lo = (a - 1) * Nr
            hi = lo + (Nr // 2 if r % Nr < Nr // 2 else Nr)
        else:
            continue
        ks, vs = lev.ks[:, :, lo - lev.base:hi - lev.base], lev.vs[:, :, lo - lev.base:hi - lev.base]
        cnt = torch.tensor(lev.cnt[lo - lev.base:hi - lev.base], dtype=q.dtype, device=q.device)
        km = m.expand_kv(ks / cnt[:, None])
        scores.append(torch.einsum("bhd,bhed->bhe", q if l == 0 else lev.q, km) + cnt.log())
        values.append(m.expand_kv(vs / cnt[:, None]))
    w = torch.cat(scores, dim=-1).softmax(-1)
    return torch.einsum("bhe,bhed->bhd", w, torch.cat(values, dim=2))


def hierarchical_step(m, x, ctx):
    """Decoding: the new tokens one by one against the cached state (a prefill starts it empty)."""
    start = ctx.offset
    q, k, v = m.qkv(x, start)
    q = q * (1.0 / math.sqrt(m.head_dim))
    key = slot(ctx, m)
    state = ctx.cache.caches.get(key)
    if state is None:
        b, _, _, dh = k.shape
        state = State([Level(k.new_zeros(b, m.kv_heads, 0, dh), v.new_zeros(b, m.kv_heads, 0, dh), [], 0, None)])
    levels = state.levels
    out = [token(m, levels, start + i, q[:, :, i], k[:, :, i], v[:, :, i]) for i in range(x.shape[1])]
    ctx.cache.caches[key] = state
    return m.out(torch.stack(out, dim=2))
