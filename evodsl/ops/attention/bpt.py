"""mha(bpt, k=K): BP-Transformer (Ye, Guo, Gan, Qiu & Zhang 2019), fine-to-coarse attention over a binary
partition of the sequence.

The positions 0 .. n-1 are the leaves of a binary tree: node p of level l is the span [p 2^l, (p+1) 2^l) (cut at
n). Token i reads, per head, in one softmax: itself, and per level l the k spans nearest to it on each side that
earlier levels have not covered (the paper's contextual edges, its graph builder's walk): level 0 holds tokens
i-1 .. i-k and i+1 .. i+k; then each pointer moves up a level, and where the next span would overlap what is
covered, the first of its k slots takes the uncovered half (a node of level l - 1) instead. The spans read
partition the whole sequence, so every token reaches every other through O(k log(n/k)) slots:

    s_i,u = (q_i . k_u + q_i . a_type(u)) / sqrt(dh),      o_i = sum_u softmax_u(s_i,u) v_u

with k_u, v_u the key and value of slot u's node and a_type a learned vector per edge type (level clipped at
`clip`, side, rank among the k; the paper's relative positions, shared by the heads; rel_pos=false drops it). A
span node is the mean of its tokens' inputs, projected by k_proj and v_proj (the mean of their keys and values):
the paper's span nodes are graph nodes updated by attention over their tokens, with their own state from layer to
layer; a single op has only its input, so each span starts from its pooled tokens. Causal (the paper's language
model): no right slots; the left spans lie wholly before i. Padding: a span pools its tokens only (one of
padding only is out); spans are counted from each row's first position, so left padding is refused (E409).
O(n k log(n/k) d) time and memory: slots gathered per query, never n x n.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...decode import slot
from ..registry import Op, OpEnv, register, require_right_padding
from ._bpt_cost import bpt_cost
from ._common import AttentionBase, AttentionParams, attention_shape

EXPORT_LEVELS = 24  # levels a symbolic n (export) is given: k 2^23 positions and more


class BPTParams(AttentionParams):
    k: int = Field(4, ge=1, le=1 << 12, description="spans read per level and side (the paper's k)")
    rel_pos: bool = Field(True, description="a learned vector per edge type (level, side, rank) added to the keys")
    clip: int = Field(3, ge=0, le=64, description="levels from here on share their edge types (the paper's clip)")


def levels(n: int, k: int) -> int:
    """Levels with a slot for some token: l with (2k - 1)(2^l - 1) < 2n - 3 (the fewest positions k levels cover
    before level l: a level's first slot may be the half node) and 2^l < n."""
    j = 0
    while (2 * k - 1) * ((1 << j) - 1) < 2 * n - 3 and (1 << j) < n:
        j += 1
    return j


def slots(i, n, k: int, causal: bool, lv: list, clip: int):
    """The span slots of the queries at positions i [t] (int64) in a sequence of n, at the levels `lv`: blocks
    (level, index, whether the span is there, span width: each [t, len(lv) k]; the edge types), left then
    (bidirectional) right. The builder's walk moves a pointer k nodes per level and halves it; in closed form,
    at level l the left pointer is floor(X / 2^l), X = i - 1 - k (2^l - 1), and where floor(X / 2^(l-1)) is even
    (the next node would overlap the covered) the first slot takes the uncovered half: node 2p of level l - 1.
    Right: Y = i + 1 + k (2^l - 1), odd, node 2p + 1. Tensor ops only, all levels at once (a symbolic n)."""
    jj = torch.tensor(lv, device=i.device)[None, :, None]
    pw = torch.tensor([2 ** j for j in lv], device=i.device)[None, :, None]
    half = torch.tensor([max(2 ** j // 2, 1) for j in lv], device=i.device)[None, :, None]
    m = torch.arange(k, device=i.device)[None, None, :]
    first = (m == 0) & (jj > 0)
    t, c = i.shape[0], len(lv) * k
    sides = [(-1, 1)] if causal else [(-1, 1), (1, 2)]
    for sign, kind in sides:
        X = i[:, None, None] + sign * (1 + k * (pw - 1))
        p = torch.div(X, pw, rounding_mode="floor") + sign * m
        h = first & (torch.div(X, half, rounding_mode="floor") % 2 == (0 if sign < 0 else 1))
        idx = torch.where(h, 2 * p + (0 if sign < 0 else 1), p)
        width = torch.where(h, half, pw)
        there = p >= 0 if sign < 0 else idx * width < n
        types = [(2 * k + 1) * min(j, clip) + 2 * u + kind for j in lv for u in range(k)]
        yield ((jj - h.long()).expand(t, -1, -1).reshape(t, c), idx.reshape(t, c), there.reshape(t, c),
               width.expand(t, -1, -1).reshape(t, c), types)


def all_slots(i, n, k: int, causal: bool, J: int, clip: int, per_level: bool):
    """The token itself, then the span slots of levels 0 .. J-1: a level at a time (per_level: small
    temporaries) or all at once (fewer ops, for export)."""
    one = torch.ones_like(i)[:, None]
    yield 0 * one, i[:, None], one > 0, one, [0]
    for lv in ([[j] for j in range(J)] if per_level else [list(range(J))] if J else []):
        yield from slots(i, n, k, causal, lv, clip)


def slot_count(k: int, causal: bool, J: int) -> int:
    return 1 + (1 if causal else 2) * k * J


def slot_table(n: int, k: int, causal: bool, J: int, clip: int):
    """(level, index, there) [n, S] and the edge types [S] of every query (for tests)."""
    blocks = list(all_slots(torch.arange(n), n, k, causal, J, clip, False))
    return (*(torch.cat([c[f] for c in blocks], 1) for f in range(3)),
            torch.tensor([t for c in blocks for t in c[4]]))


class BPTAttention(AttentionBase):
    def __init__(self, p: BPTParams, env: OpEnv):
        super().__init__(p, env)
        self.k, self.clip = p.k, p.clip
        types = (2 * p.k + 1) * (p.clip + 1)
        self.rel = nn.Parameter(torch.randn(types, self.head_dim) * self.head_dim ** -0.5) if p.rel_pos else None

    def forward(self, x, ctx):
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        key_mask = self.key_mask(ctx)
        require_right_padding(key_mask, "mha(bpt)", "its spans are counted from each row's first position, and left "
                                                    "padding moves the tokens")
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim)
        return self.o_proj(self._attend(q, k, v, 0, key_mask))

    def _step(self, x, ctx):
        """Decoding (causal): the new queries read the spans of every earlier key and value, kept in the cache
        (kv_heads heads, laid out [b, n, kv, dh]); the spans they read are pooled from it at each step."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
        old = ctx.cache.caches.get(slot(ctx, self))
        if old is not None:
            k, v = torch.cat((old[0], k), dim=1), torch.cat((old[1], v), dim=1)
        ctx.cache.caches[slot(ctx, self)] = (k, v)
        return self.o_proj(self._attend(q, k, v, k.shape[1] - t, None))

    def _attend(self, q, k, v, start, key_mask):
        """q [b, t, h, dh] at positions start .. start+t-1 against the tree over k, v [b, n, kv, dh] (projection
        layouts): the output [b, t, h dh], laid out for o_proj. Every matmul reads its operands in place: batch
        dims (b, t, kv), the g query heads of a K/V head against its S slots."""
        b, t, h, dh = q.shape
        n, kvh = k.shape[1], k.shape[2]
        symbolic = not isinstance(n, int) or torch.jit.is_tracing()
        J = EXPORT_LEVELS if symbolic else levels(n, self.k)
        i = torch.arange(start, n, device=q.device)
        cols = all_slots(i, n, self.k, self.causal, J, self.clip, per_level=not symbolic)
        kg, vg, keep, typ = (self._gather_prefix(k, v, key_mask, cols) if symbolic else
                             self._gather(k, v, key_mask, cols, J, slot_count(self.k, self.causal, J)))
        qv = q.view(b, t, kvh, h // kvh, dh)
        s = qv @ kg.transpose(-1, -2)  # [b, t, kv, g, S]
        if self.rel is not None:
            s = s.add_(qv @ self.rel[typ].T)
        w = s.mul_(dh ** -0.5).masked_fill_(~keep, float("-inf")).softmax(-1)
        if self.training and self.dropout:
            w = F.dropout(w, self.dropout)
        return (w @ vg).view(b, t, h * dh)

    def _gather(self, k, v, key_mask, cols, J: int, S: int):
        """Each slot's key and value, the mean of its span's real tokens: [b, t, kv, S, dh] (read from a tree of
        the J levels' means [b, N, kv, dh], N its nodes and one empty node, where the spans not there point);
        whether the slot is read [b | 1, t, 1, 1, S]; the edge types [S]. The slots come one at a time."""
        b, n, kvh, dh = k.shape
        J = max(J, 1)
        cnt = (torch.ones(1, n, dtype=k.dtype, device=k.device) if key_mask is None else key_mask.to(k.dtype))
        trees = []
        for x in (k, v):
            x = x if key_mask is None else x * key_mask[:, :, None, None].to(x.dtype)
            sums, parts = x, [x]
            for _ in range(1, J):
                sums = _pairs(sums, 1)
                parts.append(sums)
            parts.append(x.new_zeros(x.shape[0], 1, kvh, dh))  # the empty node
            trees.append(parts)
        counts, offsets = [cnt], [0]
        for _ in range(1, J):
            offsets.append(offsets[-1] + counts[-1].shape[1])
            counts.append(_pairs(counts[-1], 1))
        counts.append(cnt.new_zeros(cnt.shape[0], 1))
        counts = torch.cat(counts, 1)  # [1 | b, N]
        empty, offsets = counts.shape[1] - 1, torch.tensor(offsets, device=k.device)
        node, types = None, []
        for lev, idx, there, _, typ in cols:
            if node is None:
                node = torch.empty(idx.shape[0], 1, S, dtype=torch.long, device=k.device)
            node[:, 0, len(types):len(types) + len(typ)] = torch.where(there, offsets[lev] + idx.clamp(min=0), empty)
            types += typ
        heads = torch.arange(kvh, device=k.device)[None, :, None]
        inv = (1.0 / counts.clamp(min=1))[:, :, None, None]
        kg, vg = ((torch.cat(parts, 1) * inv)[:, node, heads] for parts in trees)  # [b, t, kv, S, dh]
        keep = (counts[:, node[:, 0]] > 0)[:, :, None, None, :]
        return kg, vg, keep, torch.tensor(types, device=k.device)

    def _gather_prefix(self, k, v, key_mask, cols):
        """For a symbolic n (export): span sums as differences of prefix sums, shapes that only scale n."""
        n = k.shape[1]
        cols = list(cols)
        idx, there, width = (torch.cat([c[f] for c in cols], 1) for f in (1, 2, 3))  # [t, S]
        lo = (idx.clamp(min=0) * width).clamp(max=n)
        hi = (lo + width).clamp(max=n)
        cnt = torch.ones(1, n, dtype=k.dtype, device=k.device) if key_mask is None else key_mask.to(k.dtype)
        C = F.pad(cnt.cumsum(1), (1, 0))
        c = (C[:, hi] - C[:, lo]) * there  # [1 | b, t, S]
        heads = torch.arange(k.shape[2], device=k.device)[None, :, None]
        out = []
        for x in (k, v):
            x = x if key_mask is None else x * key_mask[:, :, None, None].to(x.dtype)
            P = F.pad(x.cumsum(1), (0, 0, 0, 0, 1, 0))  # [b, n + 1, kv, dh]
            out.append((P[:, hi[:, None, :], heads] - P[:, lo[:, None, :], heads])
                       / c.clamp(min=1)[:, :, None, :, None])
        return out[0], out[1], (c > 0)[:, :, None, None, :], torch.tensor([t for c_ in cols for t in c_[4]], device=k.device)


def _pairs(t, dim: int):
    """Sums of neighbouring pairs along `dim` (1): n -> ceil(n / 2)."""
    n = t.shape[dim]
    if n % 2:
        t = torch.cat((t, t.new_zeros(*t.shape[:dim], 1, *t.shape[dim + 1:])), dim)
    return t.unflatten(dim, ((n + 1) // 2, 2)).sum(dim + 1)


OP = register(Op(
    decode="every earlier key and value (kv_heads heads), the spans pooled from them at each step",
    family="mha", variant="bpt", params=BPTParams, module=BPTAttention,
    causal="yes", shape=attention_shape, cost=bpt_cost,
    paper="BP-Transformer: Modelling Long-Range Context via Binary Partitioning, Ye et al. 2019, arXiv:1911.04070",
    summary="each token reads itself and, per level of a binary partition, its k nearest uncovered spans each side "
            "(mean-pooled keys/values, edge-type vectors); O(n k log(n/k) d)",
    note="",
))
