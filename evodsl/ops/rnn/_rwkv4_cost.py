"""The cost of rnn(rwkv4) (rwkv4.py), from the form that runs (_wkv.py): t = b n tokens, C = d channels, T = chunk,
n = q T + r (q full chunks, a last one of r tokens); P = b C (q T^2 + r^2) elements of the chunks' [L, L] tables.

FLOPs in matmuls: the four projections; per chunk exp(S - m) @ [v, 1], 4 b C L^2, backward twice that.
Other FLOPs (a convention): 5 per table element (add, mask, sub, exp, the row max), ~10 per token and channel for
the carry and the chunk's end state, 9 t d for the three mixes, 6 t C for sigmoid, the divide and the gate;
backward twice that.
Kept for backward (tD = t d elements): the three mixes and their differences x - x' (6 tD), sigmoid(r), v, the
stacked [v, 1] (2 tD), the own terms' exponentials, the quotient's numerator and denominator (2 tD), wkv, r * wkv,
each chunk's end weights: 16 tD; each chunk's exponentiated table, P in all; the carry's weights of every token
after the first chunk, b C (n - T); the [L, L] lags and masks. Inference peak: inside the largest chunk (L' =
min(T, n)), its table and the channels' [C, L', L'] decays beside ~12 b C L' of rows and 3 tD (k, v, r), or 5 tD at
the end. Backward's peak (storage tracker, net of what it has released): the largest chunk's table and its
gradient, less ~3 b C L' released by then (5 when one chunk is all), less the shorter last chunk's saved table
and rows when there is one (its backward runs first); or 2 tD.
"""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv


def rwkv4_cost(p, env: OpEnv, s: Symbols) -> Cost:
    b, n, by, d = s.b, s.n, s.bytes, s.d
    C = d
    T = s.sym("T", p.chunk)
    q = sp.floor(n / T)
    r = n - q * T
    P = b * C * (q * T ** 2 + r ** 2)
    t = b * n
    proj = linear(s, d, C, False)
    projs = proj + proj + proj + linear(s, C, d, False)
    other = 5 * P + 10 * t * C + 9 * t * d + 6 * t * C
    tD = t * d
    L2 = q * T ** 2 + r ** 2
    Lm = sp.Min(T, n)  # the largest chunk
    Pm, rows = b * C * Lm ** 2, b * C * Lm
    saved = (16 * tD + P + b * C * (n - Lm)) * by + L2 * (by + 1)
    peak = sp.Max(3 * tD + Pm + C * Lm ** 2 + 12 * rows, 5 * tD) * by
    bwd = sp.Piecewise((2 * Pm - 5 * rows, n <= T), (2 * Pm - 3 * rows - b * C * (r ** 2 + 3 * r), True))
    return Cost(params=projs.params + 3 * d + 2 * C, fwd=projs.fwd + 4 * P, bwd=projs.bwd + 8 * P,
                fwd_other=other, bwd_other=2 * other, saves_input=False, saved=saved, peak=peak,
                bwd_peak=sp.Max(2 * tD, bwd) * by, cache=b * (d + 3 * C) * by)
