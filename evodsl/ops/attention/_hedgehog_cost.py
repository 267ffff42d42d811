"""The cost of mha(hedgehog) (hedgehog.py): the shared projections, the learned maps (x W per head, two softmaxes)
and the chunked kernel of _chunked_linear.py on F = 2 f features against the values with a column of ones (dh + 1)."""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

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
    fq, FQ = b * h * n * F * by, b * h * N * F * by  # the query features, their chunked copy (= fq unpadded)
    v1, V1 = b * h * n * (dh + 1) * by, b * h * N * (dh + 1) * by  # the values with a column of ones
    R, state = b * h * m * C ** 2 * by, b * h * F * (dh + 1) * by
    q, qk, bhN = b * h * n * dh * by, b * kv * n * dh * by, b * h * N * by
    grouped = sp.Min(1, h - kv)  # keys and values repeated to the query heads
    # kept: the maps' outputs and the features, the values with their ones column, the kernel's chunked blocks,
    # decay ratios and scores, its states
    saved = 4 * fq + b * kv * n * F * by + 3 * (FQ - fq) + 2 * V1 + 2 * R + 3 * m * state + 2 * q
    # the inference peak, at the kernel's last products: q, k, v (v repeated), the features (the keys' repeated), the
    # values' ones column, their chunked copies, the zero decay and its sums, the ratios and scores, the decayed
    # queries and keys, the states, the two products
    peak = (q + 2 * qk + grouped * q + 2 * fq + v1 + padded * (2 * FQ + V1 + bhN) + 3 * bhN + 2 * R + 2 * FQ
            + (2 * m + 1) * state + 2 * V1)
    bwd_peak = 4 * q  # o_proj's input gradient and the kernel's first gradients of the heads' width
    return replace(total, saved=saved, peak=peak, cache=b * h * F * (dh + 1) * by, bwd_peak=bwd_peak,
                   saves_input=True)
