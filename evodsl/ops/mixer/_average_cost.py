"""The cost of mixer(average) (average.py): the average (a cumulative sum, or the row's sum), the FFN on the
averages (every position's causal, one a row bidirectional), the gates on every position."""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv


def average_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """Matmuls: the FFN's two maps on `rows` averages (b n causal, b bidirectional), W_y on the b n inputs and W_g on
    the rows. Elementwise (1 FLOP an element): the sum and division, relu, the gates' sum and sigmoid, the two
    products and their sum. Bytes (X = b n d): autograd keeps the averages (the FFN's input), its relu output, g (W_g's
    input and f * g's), the sigmoid's output [b, n, 2d] and (causal) the counts; the inference peak is the FFN's
    hidden layer and its relu beside the average, the gates' three [., 2d] logits beside avg and g, or the output's
    products; the backward's, the gates' gradients (i, f joined, their logits, y's two) beside g's."""
    b, n, d, by = s.b, s.n, s.d, s.bytes
    f = s.sym("d_ff", p.d_ff) if p.d_ff is not None else 4 * d
    rows = b * n if env.causal else b  # the FFN's rows: every position's average, or one a row
    X, A, F = b * n * d * by, rows * d * by, rows * f * by
    ffn = (linear(s, d, f, p.bias, tokens=rows) + linear(s, f, d, p.bias, tokens=rows)) if p.ffn else Cost()
    gates = linear(s, d, 2 * d, p.bias) + linear(s, d, 2 * d, False, tokens=rows)
    other = Cost(fwd_other=2 * b * n * d + (rows * f if p.ffn else 0) + 4 * b * n * d + 3 * b * n * d,
                 bwd_other=2 * (2 * b * n * d + (rows * f if p.ffn else 0) + 7 * b * n * d))
    count = n * by if env.causal else 0  # the divisors [n, 1]
    avg_g = 2 * A if p.ffn else A  # the averages and g (one tensor without the FFN)
    saved = avg_g + (F if p.ffn else 0) + 2 * X + count
    phases = [X + A + count,  # the sums and the averages
              A + 2 * F + count if p.ffn else 0,  # the FFN's hidden layer and its relu
              avg_g + 2 * A + 4 * X,  # W_y y, W_g g and their sum
              avg_g + 5 * X]  # the gates, the two products and the output
    return replace(ffn + gates + other, saved=saved, peak=sp.Max(*phases) - X, cache=b * d * by, saves_input=True,
                   bwd_peak=5 * X + A)
