"""The cost of mha(bpt) (bpt.py): each of the n queries against S = 1 + k J slots (causal; 1 + 2 k J
bidirectional), J the levels with a slot for some query (bpt.levels, as a formula in n), so S ~ 2 k log2(n / k).

Sizes in bytes: KG each of the gathered keys and values [b, n, kv, S, dh]; W the scores [b, n, h, S]; T the tree
of one of them, the N = sum_{l < J} ceil(n / 2^l) + 1 nodes' means [b, N, kv, dh] (N ~ 2n + J / 2 + 1:
within 2n / 2^J + J / 2 nodes); the slot table [n, S] int64. Every matmul reads its operands in place
(batch dims b, n, kv): no copy of q, of the gathered keys or of the output, which is laid out for o_proj.
"""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import attention_cost, head_symbols


def bpt_levels(n, k, k_value: int):
    """bpt.levels as a formula: #{l >= 0 : (2k - 1)(2^l - 1) < 2n - 3 and 2^l < n} (0 for n = 1), that is
    ceil(log2((2n - 3) / (2k - 1) + 1)), which is at most ceil(log2 n) for k >= 2, and at least it for k = 1."""
    if k_value == 1:
        return sp.Piecewise((0, n < 2), (sp.ceiling(sp.log(n, 2)), True))
    return sp.Piecewise((0, n < 2), (sp.ceiling(sp.log((2 * n - 3) / (2 * k - 1) + 1, 2)), True))


def bpt_cost(p, env: OpEnv, s: Symbols) -> Cost:
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    k = s.sym("k", p.k)
    J = bpt_levels(n, k, p.k)
    S = 1 + (1 if env.causal else 2) * k * J
    N = 2 * n + J / 2 + 1  # within 2n / 2^J + J / 2 nodes
    q, kvb = b * n * h * dh * by, b * n * kv * dh * by
    KG, W, T = b * n * kv * S * dh * by, b * n * h * S * by, b * N * kv * dh * by
    table = 8 * n * S
    mm = 2 * b * n * h * S * dh  # one matmul of the queries against their slots
    core = Cost(params=(2 * p.k + 1) * (p.clip + 1) * dh if p.rel_pos else 0,
                fwd=(3 if p.rel_pos else 2) * mm, bwd=2 * (3 if p.rel_pos else 2) * mm,
                fwd_other=7 * b * h * n * S + 4 * b * kv * dh * N, bwd_other=2 * (7 * b * h * n * S + 4 * b * kv * dh * N))
    # kept: q (read by the slot matmuls), the gathered keys and values, the weights, o_proj's input, the slot
    # table (the gathers' index), the mask, the edge-type vectors of the slots and their index, the means' scale
    saved = (2 * q + 2 * KG + W + table + n * S + (S * dh * by + 8 * S if p.rel_pos else 0) + b * N * by / b
             + (W if p.dropout > 0 else 0) + (b * n * h * S if p.dropout > 0 else 0))
    phases = [q + 3 * T + table + 2 * KG,  # v's slots gathered: the trees, k's slots, the scaled tree of v
              q + 2 * kvb + 2 * KG + 2 * n * S + 2 * W + q]  # the scores and the weights, the output made
    # backward: the gradients of the gathered values (or keys) and of the weights
    bwd = [KG + W]
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases,
                          cache=2 * b * n * kv * dh * by, bwd_phases=bwd)
