"""The cost of mha(hierarchical) (hierarchical.py): the levels l = 0 .. J, J = ceil(log2(n / Nr)) - 1 (none past
0 when n <= 2 Nr), level l with m_l = ceil(n / 2^l) rows in nb_l = ceil(n / (Nr 2^l)) blocks of Nr, each block's
g Nr queries (the query heads of a K/V head) against W_l keys: 3 Nr at level 0 and 2 Nr above (bidirectional),
2 Nr and Nr (causal). Explicit matmuls: scores and weights times values, 4 b h nb_l Nr W_l dh FLOPs a level.

Sizes in bytes: Q_l the level's queries laid out in blocks [b, kv, nb, g Nr, dh]; K_l (V_l) its keys' (values')
windows [b, kv, nb, W, dh]; E_l its weights [b, kv, nb, g Nr, W]; R_l a level's rows [b, h, m_l, dh].
"""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import attention_cost, head_symbols

L = sp.Symbol("l", integer=True, nonnegative=True)


def hierarchical_levels(n, Nr):
    """J, the coarse levels: #{l >= 1 : Nr 2^l < n}."""
    return sp.Max(0, sp.ceiling(sp.log(n / Nr, 2)) - 1)


def hierarchical_cost(p, env: OpEnv, s: Symbols) -> Cost:
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    Nr = s.sym("block", p.block)
    J = hierarchical_levels(n, Nr)
    causal = env.causal

    def levels(f0, f):  # level 0's term plus the coarse levels' (f of l's blocks nb and rows m)
        return f0 + sp.Sum(f(sp.ceiling(n / (Nr * 2 ** L)), sp.ceiling(n / 2 ** L)), (L, 1, J))

    W0, W = (2 * Nr, Nr) if causal else (3 * Nr, 2 * Nr)
    nb0 = sp.ceiling(n / Nr)
    scores = levels(nb0 * Nr * W0, lambda nb, m: nb * Nr * W)  # a query head's scores, all levels
    blocks = levels(nb0, lambda nb, m: nb)  # the blocks of all levels
    rows = levels(n, lambda nb, m: m)  # the rows of all levels
    core = Cost(fwd=4 * b * h * scores * dh, bwd=8 * b * h * scores * dh,
                fwd_other=b * h * scores * 6, bwd_other=b * h * scores * 12)
    q, out = b * n * h * dh * by, b * n * s.d * by
    Q = b * h * blocks * Nr * dh * by  # the queries in blocks, all levels
    KV = b * kv * dh * by * levels(nb0 * W0, lambda nb, m: nb * W)  # the keys' windows (the values' alike)
    E = b * h * scores * by
    saved = Q + 2 * KV + E + q + b * h * n * by + q  # the final sums, their normaliser, o_proj's input
    saved += 2 * b * h * (rows - n) * by  # the merges' weights
    kvb = b * n * kv * dh * by
    Q0, KV0, E0 = b * h * nb0 * Nr * dh * by, b * kv * nb0 * W0 * dh * by, b * h * nb0 * Nr * W0 * by
    K0 = b * kv * nb0 * Nr * dh * by  # level 0's keys padded to whole blocks (the values' alike)
    coarse = sp.Min(1, J)  # there are coarse levels
    R1 = coarse * b * h * (dh + 2) * by * sp.ceiling(n / 2)  # the coarser levels' sums, normalisers, maxima
    qr = b * h * n * (dh + 2) * by  # a level's sums, normalisers and maxima on level 0's rows
    base = 2 * q + 2 * kvb  # q_proj's, k_proj's and v_proj's outputs, the scaled queries
    pads = 1 if causal else 2  # the neighbour blocks' copies that make a window
    phases = [base + R1 + Q0 + 2 * K0 + KV0 + pads * K0 * (nb0 + 1) / nb0 + KV0,  # the values' window
              base + R1 + Q0 + 2 * KV0 + E0,  # level 0's scores
              base + R1 + Q0 + qr,  # its sums laid out in rows
              base + coarse * (2 * qr + 3 * q),  # the merge at level 0
              base + q + out]  # at o_proj
    # backward: o's gradient beside the division's (4 q); at level 0, the weights' gradient beside the values'
    # (KV0), then beside the scores' (E0), with its sums' and the coarser levels' (2 q), o_proj's input and the
    # sums released (~ 2.5 q)
    bwd = [4 * q, E0 + KV0 - q / 2, 2 * E0 - q / 2]
    # decoding (_hierarchical_step.py): level 0 and each level l >= 1 that has begun (Nr 2^l <= n - 1) keeps the key
    # and value sums of its clusters from block a - 2 on (a = floor(r / Nr), r = floor((n - 1) / 2^l) the current
    # cluster), and a coarse level the query of its current cluster's first token
    kept = lambda r: r + 1 - Nr * sp.Max(0, sp.floor(r / Nr) - 2)  # noqa: E731
    begun = sp.Piecewise((0, n - 1 < 2 * Nr), (sp.floor(sp.log((n - 1) / Nr, 2)), True))
    cache = (2 * b * kv * dh * by * (kept(n - 1) + sp.Sum(kept(sp.floor((n - 1) / 2 ** L)), (L, 1, begun)))
             + b * h * dh * by * begun) if causal else 0
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=cache, bwd_phases=bwd)
