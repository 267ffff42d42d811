"""The cost of mha(combiner, mode=logsparse) (_combiner_logsparse.py), the form torch runs at a known n (the export's
16 levels are not costed): K = floor(log2 max(n, 2)) + 1 levels l = 0 .. K - 1; at level l >= 1, S_l = ceil(n / 2^l)
aligned blocks, each with one span of w_l = 2^l - 1 keys per side (causal: the prefix's; bidirectional: the suffix's
too), gathered (q, k, v [b, S_l, w_l, C]), max-pooled and read by one SDPA call of the pooled query ([b S_l, kv, 1,
w_l] scores). Then each query gathers J = sides (2 K - 1) keys and values (its direct keys, then its spans' summaries)
from a table of the tokens and the summaries, and one SDPA call reads them ([b n, h, 1, J] scores, a [b n, 1, 1, J]
mask, which the kernel turns into an additive one of the input's dtype; the pools' masks likewise)."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import LSE_BYTES, attention_cost, head_symbols

L = sp.Symbol("l", integer=True, positive=True)


def logsparse_levels(n):
    """K: the levels 2^0 .. 2^(K-1) that cut a prefix of up to n keys."""
    return sp.floor(sp.log(sp.Max(n, 2), 2)) + 1


def logsparse_cost(p, env: OpEnv, s: Symbols) -> Cost:
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    K = logsparse_levels(n)
    sides = 1 if env.causal else 2

    def levels(f):  # f(S, w) summed over the levels 1 .. K - 1 and the sides
        return sides * sp.Sum(f(sp.ceiling(n / 2 ** L), 2 ** L - 1), (L, 1, K - 1))

    spans = levels(lambda S, w: S * w)  # the positions gathered into spans, all levels
    blocks = levels(lambda S, w: S)  # the summaries, all levels
    J = sides * (2 * K - 1)
    s1, s2 = b * kv * spans, b * n * h * J  # the pools' scores, the queries'
    q, out = b * n * h * dh * by, b * n * s.d * by
    kvb = b * n * kv * dh * by
    G = b * spans * (h + 2 * kv) * dh * by  # the gathered spans' q, k, v
    summ = b * blocks * kv * dh * by  # a pooled query, key or a summary value, all levels
    KJ = b * n * J * kv * dh * by  # the keys (values) gathered for the queries
    core = Cost(fwd=4 * (s1 + s2) * dh, bwd=10 * (s1 + s2) * dh,
                fwd_other=5 * (s1 + s2) + G, bwd_other=10 * (s1 + s2) + 2 * G)
    saved = (8 * spans + G + 3 * summ + LSE_BYTES * b * blocks * kv + b * spans * by  # the pools
             + 8 * n * J + 2 * KJ + q + q + LSE_BYTES * b * n * h + b * n * J * by)  # the queries' call
    table = 2 * (kvb + summ)  # the tokens' and summaries' keys and values, concatenated
    # the projections, the summaries; each query's J indices (int64) and keep flags, held as lists of J columns and
    # stacked; the last level's positions and flags (~ 5 n int64)
    live = q + 2 * kvb + 2 * summ + 16 * n * J + n * J + 40 * n
    phases = [live + table / 2 + 2 * KJ,  # the values gathered, the keys' table released
              live + 2 * KJ + b * n * J * (1 + by) + q + LSE_BYTES * b * n * h,  # the queries' call
              q + out]  # at o_proj
    bwd = [2 * q + 2 * KJ]  # the queries' call: the gradients of q, the keys and the values
    cache = b * n * (h + 2 * kv) * dh * by  # decoding: every position's q, k, v
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=cache, bwd_phases=bwd)
