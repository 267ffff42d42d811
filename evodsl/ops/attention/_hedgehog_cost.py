"""The cost of mha(hedgehog) (hedgehog.py): the shared projections, the learned maps (x W per head, two softmaxes)
and the chunked kernel of _chunked_linear.py on F = 2 f features against the values with a column of ones (dh + 1)."""
from __future__ import annotations

from dataclasses import replace

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import head_symbols, projections_cost
from ._recurrent_cost import chunk_symbols, decay_kernel_flops


def hedgehog_cost(p, env: OpEnv, s: Symbols) -> Cost:
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    f = s.sym("f", p.feature_dim) if p.feature_dim else dh
    F = 2 * f
    C, m, N, several, padded = chunk_symbols(p, s)
    fwd, bwd = decay_kernel_flops(b, h, N, C, F, dh + 1, several)
    maps = Cost(params=(h + kv) * dh * f, fwd=2 * b * n * (h + kv) * dh * f, bwd=4 * b * n * (h + kv) * dh * f)
    total = projections_cost(p, s, h, kv, dh) + maps + Cost(fwd=fwd, bwd=bwd)
    t, T = b * h * n * F * by, b * h * N * F * by  # one feature tensor, its chunked copy
    tk = b * kv * n * F * by
    v1 = b * h * n * (dh + 1) * by
    R = b * h * m * C ** 2 * by
    state = b * h * F * (dh + 1) * by
    q = b * n * h * dh * by
    saved = (b * n * (h + kv) * f * by + t + tk + 2 * t + padded * 2 * T + 2 * v1 + 3 * R + m * state
             + b * h * N * by * (1 + several) + 2 * q)
    peak = 4 * t + padded * 2 * T + 2 * v1 + 3 * R + (m + 1) * state + 3 * q
    bwd_peak = 2 * t + R + v1 + q
    return replace(total, saved=saved, peak=peak, cache=b * h * F * (dh + 1) * by, bwd_peak=bwd_peak,
                   saves_input=True)
