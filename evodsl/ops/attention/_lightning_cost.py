"""The cost of mha(lightning) (lightning.py): the shared projections and the gate's, the scalar-decay chunked kernel
of _chunked_linear.py (decay_kernel_flops), the swishes and the SRMSNorm around it."""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from ._common import head_symbols, projections_cost
from ._recurrent_cost import chunk_symbols, decay_kernel_flops


def lightning_cost(p, env: OpEnv, s: Symbols) -> Cost:
    h, kv, dh = head_symbols(p, s)
    b, by = s.b, s.bytes
    C, m, N, several, padded = chunk_symbols(p, s)
    fwd, bwd = decay_kernel_flops(b, h, N, C, dh, dh, several)
    total = projections_cost(p, s, h, kv, dh) + linear(s, s.d, h * dh, p.bias) + Cost(fwd=fwd, bwd=bwd)
    t, T, R, Z = b * h * s.n * dh * by, b * h * N * dh * by, b * h * m * C ** 2 * by, b * h * m * dh ** 2 * by
    chunked = t + padded * (T - t)
    saved = (2 * t + 3 * chunked + 2 * R + Z + b * h * N * by + several * (2 * T + b * h * N * by + b * h * m * by)
             + 4 * t + b * s.n * by)
    state = b * h * dh ** 2 * by
    peak = 5 * t + padded * 3 * T + 2 * R + 3 * T + (2 * m + 1) * state
    out = b * s.n * s.d * by
    # the backward's peak: the output side (o_proj's and the gate's gradients, two of the heads' width, beside the
    # input's from u_proj; the norm's statistics released), or the scores' gradient [C, C] once the output side has
    # released its heads
    rms = b * s.n * by
    bwd_peak = sp.Max(2 * t + out - rms, out - t - rms + R)
    return replace(total, saved=saved, peak=peak - out, cache=b * h * dh ** 2 * by, bwd_peak=bwd_peak,
                   saves_input=True)
