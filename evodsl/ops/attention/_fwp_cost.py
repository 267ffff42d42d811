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
    f, fk, q = t, b * kv * n * F * by, b * n * h * dh * by
    # kept: DPFP's pieces for q and k (ReLU([x, -x]), its rolled copies and products, the sums), the chunked blocks
    # (K K^T, the triangle, the scores), the solution [U0 W] and the states before every chunk; fitted at the harness
    # sizes (within 3%), term by term where the kernel's tensors are known
    saved = 4 * f + 4 * fk + 3 * TV + 4 * R + 2 * m * state + 4 * q
    peak = 2 * t + tv + padded * (2 * T + TV) + 2 * b * h * N * (F + dh) * by + 4 * R + 2 * state
    # the backward's peak, in the triangular solve's backward: the gradients of the features (q, k and their chunked
    # copies) beside the triangle's [C, C] (fitted at the harness sizes, within 7%)
    bwd_peak = 4 * f + 4 * (T - t) - TV - q + R
    return replace(total, saved=saved, peak=peak, cache=b * h * F * dh * by, bwd_peak=bwd_peak,
                   saves_input=True)
