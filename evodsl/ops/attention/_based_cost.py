"""The cost of mha(based) (based.py): the window branch as mha(local) runs it (_banded.py's banded_attention_cost,
with the shared q, k, v and o projections), plus the linear branch: the feature projections, the Taylor map and the
chunked kernel of _chunked_linear.py on F = 1 + f + f^2 features against the values with a column of ones (dv + 1)."""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from ._banded import banded_attention_cost
from ._common import head_symbols
from ._recurrent_cost import chunk_symbols, decay_kernel_flops


def based_cost(p, env: OpEnv, s: Symbols) -> Cost:
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    f, w = s.sym("f", p.feature_dim), s.sym("w", p.window)
    F = 1 + f + f ** 2
    window = banded_attention_cost(p, env, s, lo=w - 1, hi=0, cache_keys=w)
    C, m, N, several, padded = chunk_symbols(p, s)
    fwd, bwd = decay_kernel_flops(b, h, N, C, F, dh + 1, several)
    lin = linear(s, s.d, h * f, p.bias) + linear(s, s.d, kv * f, p.bias) + Cost(fwd=fwd, bwd=bwd)
    t, T = b * h * n * F * by, b * h * N * F * by  # one feature tensor, its chunked copy
    v1 = b * h * n * (dh + 1) * by
    R = b * h * m * C ** 2 * by
    state = b * h * F * (dh + 1) * by
    saved = (b * n * (h + kv) * f * by + 2 * t + padded * 2 * T + 2 * v1 + 3 * R + m * state
             + b * h * N * by * (1 + several))
    peak = 4 * t + padded * 2 * T + 2 * v1 + 3 * R + (m + 1) * state + b * h * n * dh * by
    cache = b * h * F * (dh + 1) * by
    return replace(window + lin, saved=window.saved + saved, peak=window.peak + peak,
                   cache=window.cache + cache, bwd_peak=sp.Max(window.bwd_peak, 2 * t + R + v1 - padded * t), saves_input=True)
