"""The cost of the chunked linear recurrences (retention.py, gla.py, deltanet.py, gated_deltanet.py): their
projections, then the chunked kernel that torch runs at a known n (_chunked_linear.py, _chunked_delta.py; the
export's one-piece form, a symbolic n, is not costed: tests/test_onnx.py OTHER_FORMS)."""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from ._common import head_symbols, projections_cost


def _chunks(p, s: Symbols):
    C = sp.Min(p.chunk, s.n)
    m = sp.ceiling(s.n / C)
    return C, m, m * C


def retention_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """Chunks of C = min(chunk, n) tokens, m of them (N = m C rows, the last chunk zero-padded); per query head
    and chunk the [C, C] scores q k^T and their product with V, the chunk's state K^T V and the queries against
    the state before it: 4 b h N C dh + 4 b h N dh^2 FLOPs forward, twice that backward; the gate's projection."""
    h, kv, dh = head_symbols(p, s)
    b, by = s.b, s.bytes
    C, m, N = _chunks(p, s)
    kernel = 4 * b * h * N * C * dh + 4 * b * h * N * dh ** 2
    total = projections_cost(p, s, h, kv, dh) + linear(s, s.d, h * dh, p.bias)
    norm = 2 * h * dh  # GroupNorm's scale and shift
    core = Cost(params=norm, fwd=kernel, bwd=2 * kernel)
    return replace(total + core, saved=0, peak=0, cache=b * h * dh ** 2 * by, saves_input=True)
