"""The cost of mha(fwp) (fwp.py): the shared projections and beta's, the DPFP map on q and k, the delta rule's chunked
WY kernel of _chunked_delta.py (delta_kernel_flops) on F = 2 dh nu features against the dh-wide values."""
from __future__ import annotations

from dataclasses import replace

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from ._common import head_symbols, projections_cost
from ._recurrent_cost import chunk_symbols, delta_kernel_flops


def fwp_cost(p, env: OpEnv, s: Symbols) -> Cost:
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    F = 2 * dh * p.nu
    C, m, N, several, padded = chunk_symbols(p, s)
    fwd, bwd = delta_kernel_flops(b, h, N, C, F, dh)
    total = projections_cost(p, s, h, kv, dh) + linear(s, s.d, h, p.bias) + Cost(fwd=fwd, bwd=bwd)
    t, T, R = b * h * n * F * by, b * h * N * F * by, b * h * m * C ** 2 * by
    tv, TV = b * h * n * dh * by, b * h * N * dh * by
    state = b * h * F * dh * by
    r = b * n * (h + kv) * 2 * dh * by  # ReLU([x, -x]) of q and k
    saved = (3 * r * p.nu + 2 * t + padded * (2 * T + TV + b * h * N * by) + 3 * R + 2 * C ** 2
             + b * h * N * (F + dh) * by + m * state + TV + b * n * h * by)
    peak = 2 * t + tv + padded * (2 * T + TV) + 2 * b * h * N * (F + dh) * by + 4 * R + (m + 1) * state
    return replace(total, saved=saved, peak=peak, cache=b * h * F * dh * by, bwd_peak=2 * t + R,
                   saves_input=True)
