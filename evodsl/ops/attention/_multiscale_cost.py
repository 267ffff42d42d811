"""The cost of mha(multiscale) (multiscale.py): each of the n queries against W near slots (S (w + k - 1) a side:
causal one side, bidirectional two) and the N = ceil(n / k^S) blocks of the last scale, masked; explicit matmuls.

Sizes in bytes: G the gathered near keys (values) [b, kv, n, W, dh], read by the g query heads of their K/V head
(grouped, not repeated); T the last scale's keys (values) [b, kv, N, dh]; A the weights; the prefix sums.
"""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import attention_cost, head_symbols


def multiscale_cost(p, env: OpEnv, s: Symbols) -> Cost:
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    w, k, S = s.sym("w", p.window), s.sym("k", p.pool), p.scales
    W = (1 if env.causal else 2) * S * (w + k - 1)
    N = sp.ceiling(n / k ** S)
    scores = b * h * n * (W + N)
    core = Cost(fwd=4 * scores * dh, bwd=8 * scores * dh, fwd_other=7 * scores, bwd_other=14 * scores)
    q, out, kvb = b * n * h * dh * by, b * n * s.d * by, b * n * kv * dh * by
    A = scores * by  # the weights [b, kv, n, g, W + N]
    G, T = b * kv * n * W * dh * by, b * kv * N * dh * by  # the near slots' keys (values); the last scale's
    Pre = b * kv * (n + 1) * dh * by  # a prefix sum
    idx = 8 * (2 * n * W + 2 * N)  # the gathers' indices (first, last)
    # kept: the grouped queries, the slots' keys and values, the weights, o_proj's input, the gathers' indices,
    # the masks, the slots' sizes (the means' divisors)
    saved = q + 2 * G + 2 * T + A + q + idx + n * W + n * N + (n * W + N) * by
    base = q + 2 * kvb  # q_proj's, k_proj's and v_proj's outputs
    ix = 8 * 2 * n * W + n * W  # the near slots' ranges (first, last) and validity
    phases = [base + ix + 2 * Pre + 4 * G,  # the values' means: two gathers and their difference beside the keys'
              base + 2 * Pre + 2 * G + 2 * T + 2 * q,  # the grouped queries
              base + 2 * G + 2 * T + q + 2 * A,  # the softmax
              base + 2 * G + 2 * T + A + 3 * q + q,  # the output, laid out for o_proj
              base + q + out]  # at o_proj
    # backward: at the near slots' matmuls, the values' gradient beside the weights' gradient (A) and that of its
    # first W columns; then the softmax's input gradient from its two slices (each laid into a full A) and their sum
    bwd = [G + A + b * h * n * W * by, 3 * A - q]
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases,
                          cache=2 * b * n * kv * dh * by if env.causal else 0, bwd_phases=bwd)
