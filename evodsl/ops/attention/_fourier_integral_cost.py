"""The cost of mha(fourier_integral) (fourier_integral.py): the tiled kernel (_fourier_integral_kernel.py) that
runs at a known n (the export's plain form, _plain, is not costed: tests/test_onnx.py runs it)."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import attention_cost, head_symbols


def fourier_integral_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """Tiles of Bq = min(B, n) queries x Bq keys. FLOPs: the matmuls, P V forward, P^T dO and dO V^T backward, over
    every pair the loops visit (causal: each query block against the keys up to its last, whole tiles). Memory:
    the workspace of one call (allocated once, reused by every tile): forward two [b, h, Bq, Bq, dh] tiles (the
    differences, the sincs), the [b, h, Bq, Bq] scores, the running sums and the [b, h, Bq, dh] accumulator and
    matmul output; backward two tiles (x, then the sincs and g(x)), two score tiles, three [b, h, Bq, dh] (do,
    dq and its sum) and two [b, kv, Bq, dh] (the dk, dv sums); beside them R q and R k, and V^T. Causal: the
    diagonal tile's int64 offsets and bool mask. Kept for backward: q, k, v, o and the log normaliser per query.
    GQA's backward measures up to 5% above (a copy at the K/V heads' grouping, not modelled)."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    B = s.sym("B", p.block)
    nb = sp.ceiling(n / B)
    pairs = (B ** 2 * (nb - 1) * nb / 2 + (n - (nb - 1) * B) * n) if env.causal else n ** 2
    core = Cost(params=1 if p.learn_R else 0, fwd=2 * b * h * pairs * dh, bwd=4 * b * h * pairs * dh,
                fwd_other=b * h * pairs * (8 * dh + 5), bwd_other=b * h * pairs * (19 * dh + 7))
    Bq = sp.Min(B, n)
    rows = b * h * Bq  # the query rows of a tile, every head
    tile, scores, acc = rows * Bq * dh * by, rows * Bq * by, rows * dh * by
    mask = (9 * Bq ** 2 + 16 * Bq) * sp.Min(1, Bq - 1) if env.causal else 0  # c - r (int64), its bool, aranges
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    lse = b * h * n * by  # per query, D (do . o) alike
    saved = 2 * q + 2 * kvb + lse  # q, k, v, o, lse
    # q, k, v, V^T, o, R q and R k; the workspace
    phases = [3 * q + 4 * kvb + lse + 2 * tile + scores + 2 * acc + 4 * rows * by + mask,
              2 * q + 2 * kvb + out]  # at o_proj
    # o's gradient, D, V^T, R q and R k, the gradients of q, k, v; the workspace
    bwd = [3 * q + 4 * kvb + lse + 2 * tile + 2 * scores + 3 * acc + 2 * b * kv * Bq * dh * by + mask]
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=2 * kvb, bwd_phases=bwd)
