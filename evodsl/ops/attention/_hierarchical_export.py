"""mha(hierarchical)'s export form (a symbolic n): the same weights as hierarchical.py's levels, computed per
query at full resolution, with no axis whose length depends on the level (torch.export cannot branch on n).

Level l of query t: its cluster r = floor(t / 2^l), block a = floor(r / Nr), place i = r mod Nr; the clusters c of
the blocks the level reads (hierarchical.pattern's window: a - 1 .. a + 1 at level 0, a - 1 and a + 1 above;
causal a - 1 and a, then a - 1) have their key and value sums and sizes from prefix sums over the sequence
(P[min(n, (c + 1) 2^l)] - P[min(n, c 2^l)]: 0 tokens before 0 or past n); the coarse query is the mean over t's
cluster (causal: its first token's query). All the levels' scores share one softmax per query, which is the sum
the forward merges level by level. EXPORT_LEVELS levels always run, those past what n needs read no key (their
neighbour blocks lie past n): the export serves n <= Nr 2^EXPORT_LEVELS. O(n Nr d EXPORT_LEVELS) (not the
forward's O(n Nr d)); the prefix sums' differences lose precision at very long n in float32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EXPORT_LEVELS = 16


def gathered(m, q, k, v, key_mask):
    """q [b, h, n, dh], k, v [b, kv, n, dh], key_mask [b, n] or None -> o [b, h, n, dh]."""
    from .hierarchical import pattern

    b, h, n, dh = q.shape
    Nr, dev, causal = m.block, q.device, m.causal
    head = torch.arange(h, device=dev) // (h // m.kv_heads)  # each query head's K/V head
    qs = q * (1.0 / math.sqrt(dh))
    cnt = torch.ones_like(q[:1, 0, :, 0]) if key_mask is None else key_mask.to(q.dtype)  # [B, n]
    w = cnt[:, None, :, None]
    k, v = k * w, v * w
    Pk, Pv = (F.pad(t.cumsum(2), (0, 0, 1, 0)) for t in (k, v))  # [b, kv, n + 1, dh]: sums before each position
    Pq = None if causal else F.pad((qs * w).cumsum(2), (0, 0, 1, 0))
    Pc = F.pad(cnt.cumsum(-1), (1, 0))  # [B, n + 1]
    t = torch.arange(n, device=dev)
    parts, values = [], []
    for level in range(EXPORT_LEVELS):
        size = 1 << level
        r = torch.div(t, size, rounding_mode="floor")
        a, i = torch.div(r, Nr, rounding_mode="floor"), r % Nr
        allowed = pattern(Nr, level, causal, dev)  # [Nr, W]
        j = torch.arange(allowed.shape[1], device=dev)
        skip = Nr * (j >= Nr) if level and not causal else 0  # bidirectional above 0: blocks a - 1 and a + 1
        c = (a[:, None] - 1) * Nr + j + skip  # [n, W]: the clusters read
        lo, hi = (c * size).clamp(0, n), ((c + 1) * size).clamp(0, n)
        count = Pc[:, hi] - Pc[:, lo]  # [B, n, W]
        per = count.clamp(min=1)[:, None, :, :, None]
        km = ((Pk[:, :, hi] - Pk[:, :, lo]) / per).index_select(1, head)  # [b, h, n, W, dh]
        vm = ((Pv[:, :, hi] - Pv[:, :, lo]) / per).index_select(1, head)
        if level == 0:
            ql = qs
        elif causal:
            ql = qs[:, :, r * size]
        else:
            tl, th = r * size, ((r + 1) * size).clamp(max=n)
            ql = (Pq[:, :, th] - Pq[:, :, tl]) / (Pc[:, th] - Pc[:, tl]).clamp(min=1)[:, None, :, None]
        s = (km @ ql[..., None])[..., 0]  # [b, h, n, W]
        bias = torch.where(count > 0, count.clamp(min=1).log(), torch.full_like(count, float("-inf")))
        parts.append((s + bias[:, None]).masked_fill(~allowed[i], float("-inf")))
        values.append(vm)
    s = torch.cat(parts, dim=-1)
    mx = s.amax(-1, keepdim=True).clamp(min=torch.finfo(s.dtype).min)
    e = (s - mx).exp()
    num = (e[..., None, :] @ torch.cat(values, dim=3))[..., 0, :]  # [b, h, n, dh]
    return num / e.sum(-1, keepdim=True).clamp(min=torch.finfo(s.dtype).tiny)
