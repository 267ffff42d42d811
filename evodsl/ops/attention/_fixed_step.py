"""The step form of mha(fixed) (fixed.py), causal: each new position's map reads only what its pattern reaches, so
the state per layer is

    window   V of the last R positions, R = w (local: keys i-w .. i) or 1 (prev), the larger of the patterns present
    global   the sum of V over every position so far (the cumulative mean's numerator; its count is the position)
    vertical the sum of V over the first min(t, g) positions (its count min(t + 1, g))

on the K/V heads (each query head reads its K/V head's), O((R + 2) kv dh) whatever t; diagonal (and causal next,
the token itself) keeps nothing. No pattern needs every past position. New positions start .. start + T - 1 run the
forward's own maps over [the window, the new V] (local's band, prev's shift: the window's first row is position
start - m, m = min(start, R), so the band's clipping at its start is position 0's) and the running sums.
"""
from __future__ import annotations

import torch

from ...decode import slot


def fixed_step(m, v: torch.Tensor, ctx) -> torch.Tensor:
    """v [b, T, kv, dh], the new positions' values -> each query head's map [b, T, h, dh]; updates the state."""
    key, start = slot(ctx, m), ctx.offset
    b, T, kv, dh = v.shape
    pats = set(m.groups)
    R = max(m.window if "local" in pats else 0, 1 if "prev" in pats else 0)
    old = ctx.cache.caches.get(key)
    zeros = v.new_zeros(b, kv, dh)
    win, gsum, vsum = old if old is not None else (v.new_empty(b, 0, kv, dh), zeros, zeros)
    ext = torch.cat((win, v), 1)  # positions start - m ..
    w0 = win.shape[1]
    pos = torch.arange(start, start + T, device=v.device, dtype=v.dtype)[None, :, None, None]
    first = (pos < m.globals).to(v.dtype)  # vertical: the new positions among the first g
    gcum = gsum[:, None] + v.cumsum(1) if "global" in pats else None
    vcum = vsum[:, None] + (v * first).cumsum(1) if "vertical" in pats else None

    def attend(pat, e, g_cum, v_cum):
        if pat in ("prev", "local"):
            return m.attend(pat, e, None)[:, w0:]
        if pat == "global":
            return g_cum / (pos + 1)
        if pat == "vertical":
            return v_cum / torch.clamp(pos + 1, max=m.globals)
        return e[:, w0:]  # diagonal

    g = m.heads // m.kv_heads
    if len(m.groups) == 1:
        o = attend(next(iter(m.groups)), ext, gcum, vcum)
        o = o if g == 1 else o.repeat_interleave(g, dim=2)
    else:
        rep = (lambda t: t) if g == 1 else (lambda t: None if t is None else t.repeat_interleave(g, dim=2))
        eh, gh, vh = rep(ext), rep(gcum), rep(vcum)
        outs = [attend(pat, eh[:, :, heads], None if gh is None else gh[:, :, heads],
                       None if vh is None else vh[:, :, heads]) for pat, heads in m.groups.items()]
        o = torch.cat(outs, dim=2)[:, :, m.inverse]
    none = v.new_empty(b, kv, 0)  # a pattern's state that is not there (no storage, none counted)
    ctx.cache.caches[key] = (ext[:, ext.shape[1] - min(ext.shape[1], R):].clone(),
                             gcum[:, -1].clone() if gcum is not None else none,
                             vcum[:, -1].clone() if vcum is not None else none)
    return o
