"""The cost of xattn(merged) (merged.py): xattn(softmax)'s (the projections, SDPA on [b, h, m, n] scores), plus W_v
on the stream's own inputs, the average and the sum before W_o."""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..attention._common import LSE_BYTES, head_symbols
from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from .softmax import cost as cross_cost


def merged_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """Matmuls: xattn(softmax)'s, and W_v on the b m stream rows (its parameters counted once: shared). Elementwise:
    the average (causal: the cumulative sum and the division, 2 an element; bidirectional: the row's sum, and one
    division a row), the sum o + avg (b m h dh); their backward, one each, and the GQA expansion's sum.

    Bytes (A = b m kv dh, O = b m h dh, X = b m d): autograd keeps xattn's and the sum W_o reads (SDPA keeps its own
    output too; with dropout, the math kernel keeps its weights instead, and the sum replaces its output) and, causal,
    the counts [m, 1]. The inference peak is xattn's, with the sum beside it and the average: expanded to the query
    heads (GQA), else the cumulative one (causal) or the row sums (bidirectional: a [b, 1, kv dh] broadcast). The average runs before the kernel, so its backward runs after the kernel's: the
    backward's phases are xattn's kernel with o's gradient the sum's (released: -O), the source's projections with
    x's gradient from W_v alive (+X, the sum released), and the queries' (+X). The decoding state adds the running
    sum (kv dh a row)."""
    h, kv, dh = head_symbols(p, s)
    b, m, by = s.b, s.n, s.bytes
    n = s.length(env.in_shapes[1][1])
    base = cross_cost(p, env, s)
    A, O, X = b * m * kv * dh, b * m * h * dh, b * m * s.d
    expand = O if p.kv_heads not in (None, p.heads) else 0
    avg_flops = 2 * A if env.causal else A + b * kv * dh
    own_v = replace(linear(s, s.d, kv * dh, p.bias), params=0)
    other = Cost(fwd_other=avg_flops + O, bwd_other=2 * A + expand)
    count = m * by if env.causal else 0
    q, kvb, kv_in = O * by, b * n * kv * dh * by, b * n * s.d * by
    if p.dropout > 0:  # the math kernel (xattn's formulas): the sum is saved where SDPA's output was
        saved = base.saved + count
        bwd_peak = base.bwd_peak
    else:
        saved = base.saved + O * by + count
        mask = m * n * by if env.in_causal[1:2] == (True,) and env.in_shapes[1][1] != env.shape[1] else 0
        xsaved = 2 * q + 2 * kvb + LSE_BYTES * b * h * m + mask  # what xattn keeps
        bwd_peak = sp.Max(2 * q + 2 * kvb - O * by, q + 3 * kv_in - xsaved + X * by - O * by, q + X * by + kv_in - xsaved + X * by)
    return replace(base + own_v + other, saved=saved, peak=base.peak + (O + (expand or (A if env.causal else b * kv * dh))) * by,
                   cache=base.cache + b * kv * dh * by, bwd_peak=bwd_peak, saves_input=True, saves_output=False)
