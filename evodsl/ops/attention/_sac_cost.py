"""The cost of mha(sac) (sac.py): the projections and the edge predictor's two (d -> r), the edge scores of every
(query, key) pair in query chunks without autograd (topk.py's selection on one head of width r), then per query its
k edges: the edge keys gathered and dotted with a_i (the edge scores, with autograd), the K/V heads' keys and values
gathered ([b, kv, n, k, dh]) and one SDPA call of [b kv n, 1, g, dh] query rows against k keys with the edge scores
as an additive mask."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import LSE_BYTES, attention_cost, head_symbols
from ._sigmoid_cost import sigmoid_pairs


def sac_cost(p, env: OpEnv, s: Symbols) -> Cost:
    h, kv, dh = head_symbols(p, s)
    b, n, by, d = s.b, s.n, s.bytes, s.d
    C, k, r = s.sym("C", p.chunk), s.sym("k", p.k), s.sym("r", p.edge_dim)
    pairs = sigmoid_pairs(s, C, env.causal)  # the scored (query, key) pairs: causal, each chunk up to its end
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * d * by
    E = b * n * r * by  # a_i (c_j alike)
    # the edge predictor's two projections; backward: their input and weight gradients
    edge_proj = Cost(params=2 * d * r, fwd=4 * b * n * d * r, bwd=8 * b * n * d * r)
    select = Cost(fwd=2 * b * pairs * r, fwd_other=2 * b * pairs)
    # the edges' call: the additive mask (the edge scores) needs a gradient, so training runs SDPA's math form (its
    # backward four bmm, no recomputation)
    core = Cost(fwd=4 * b * h * n * k * dh, bwd=8 * b * h * n * k * dh, fwd_other=5 * b * h * n * k,
                bwd_other=10 * b * h * n * k)
    g = b * kv * n * k * dh * by  # the gathered keys (values) [b, kv, n, k, dh]
    ce = b * n * k * r * by  # the chosen edges' c_j [b, n, k, r]
    P = b * h * n * k * by  # the math form's weights
    idx, keep = 8 * b * n * k, b * n * k
    # saved: the edges' index, a_i and the gathered c_j (their product), the keep flags; the math call's q rows (a
    # copy), k, v, weights; o_proj's input
    saved = idx + E + ce + keep + 2 * g + 2 * q + P
    phases = [q + 2 * kvb + 2 * E + b * sp.Min(C, n) * n * by + idx + keep,  # the selection's workspace
              q + 2 * kvb + 2 * E + idx + keep + 2 * ce,  # the edge scores: the chosen c_j times a_i
              # the edges' call (inference: the fused kernel): q rows copied, the edge scores and their mask copy
              q + 2 * kvb + 2 * E + idx + keep + b * n * k * by + 2 * g + q + b * kv * n * k * by + q
              + LSE_BYTES * b * h * n + (0 if kv == h else q),  # (grouped heads: o laid out for o_proj, a copy)
              q + out]
    bwd = [g + P]  # the math call's backward: a gathered key's (value's) gradient beside the weights'
    cache = 2 * kvb + E
    return attention_cost(p, s, h, kv, dh, edge_proj + select + core, Cost(), saved, phases, cache=cache,
                          bwd_phases=bwd)
