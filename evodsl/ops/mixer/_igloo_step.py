"""The step form of mixer(igloo) (igloo.py), causal: position t reads the convolution's inputs t - k + 1 .. t, and
its patches and values were drawn from t - R .. t (R = ceil(3 sigma), the draws' reach), so the state per layer is

    the last k - 1 inputs X            [b, k - 1, d]   (the convolution's taps before t)
    the last R compressed features C   [b, R, c]       (the patches' sums read C W_B at the drawn positions)
    the last R values H W_v            [b, R, d]       (the gathered values)

O(k d + R (c + d)) whatever t (fewer while t is smaller). New positions start .. start + T - 1: their features from
[the kept inputs, the new ones] (the forward's causal convolution: zeros before position 0), then C and the values
appended to the kept ones, read at the drawn positions (absolute, less the first kept position: start - m, m =
min(start, R)), as the forward reads them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...decode import slot
from ...diagnostics import Diagnostic, EvoError


def reach(spread: float) -> int:
    """R: how far back a causal draw reaches (igloo.draw_patches's offsets -R .. 0)."""
    return math.ceil(3 * spread)


def igloo_step(m, x: torch.Tensor, ctx) -> torch.Tensor:
    """x [b, T, d], the new positions' inputs -> their outputs [b, T, d]; updates the state."""
    key, start = slot(ctx, m), ctx.offset
    b, T, d = x.shape
    if start + T > m.pos.shape[0]:
        raise EvoError([Diagnostic("E410", f"mixer(igloo) has max_len={m.pos.shape[0]}, the input {start + T} positions",
                                   help=f"its patches are drawn for max_len positions: set max_len >= {start + T}")])
    R = m.reach
    old = ctx.cache.caches.get(key)
    xs, cs, vs = old if old is not None else (x.new_empty(b, 0, d), x.new_empty(b, 0, m.compress.out_features),
                                              x.new_empty(b, 0, d))
    xe = torch.cat((xs, x), 1)
    h = m.conv(F.pad(xe.transpose(1, 2), (m.k - 1 - xs.shape[1], 0)))  # [b, d, T]: the causal taps
    h = F.leaky_relu(h, 0.1).transpose(1, 2)
    ce, ve = torch.cat((cs, m.compress(h)), 1), torch.cat((vs, m.value(h)), 1)  # positions start - w0 ..
    w0 = cs.shape[1]
    PL = m.P * m.L
    pos = m.pos[start:start + T] - (start - w0)  # [T, P, L], in the kept window
    e = ce @ m.w_base  # [b, w0 + T, P L]
    flat = pos * PL + torch.arange(PL, device=x.device).view(m.P, m.L)
    a = m.mix(e.flatten(1)[:, flat].sum(-1) + m.p_bias)  # [b, T, P]
    vpos = m.vpos[start:start + T] - (start - w0)
    o = a[..., 0, None] * ve[:, vpos[:, 0]]
    for q in range(1, m.P):
        o.add_(a[..., q, None] * ve[:, vpos[:, q]])
    keep = m.k - 1
    ctx.cache.caches[key] = (xe[:, xe.shape[1] - min(xe.shape[1], keep):].clone(),
                             ce[:, ce.shape[1] - min(ce.shape[1], R):].clone(),
                             ve[:, ve.shape[1] - min(ve.shape[1], R):].clone())
    return m.out(o)
