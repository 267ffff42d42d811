"""The cost of mha(luna) (luna.py). Bidirectional: the projections, the pack as two SDPA calls over [b, h, L, n]
scores, the unpack as one over [b, h, n, L]. Causal: the pack scores, then two chunked linear attentions
(_chunked_linear.py's chunked_plain: no decay), the first with queries q, keys k and the pack weights a as values
(dk = dh, dv = L), the second with the unpack weights w as queries, a as keys and v as values (dk = L, dv = dh).

Symbols beside attention's (_common.py) and the chunks' (_recurrent_cost.chunk_symbols: C, m, N = m C, padded): in
bytes, q = b n h dh (a head tensor), T = b h N dh (its chunked copy, padded), l = b h n L (the pack scores, a or w),
TL = b h N L (their chunked copy), R = b h m C^2 (the [C, C] blocks), Z = b h m dh L (one state before every chunk).
"""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import LSE_BYTES, attention_cost, head_symbols
from ._recurrent_cost import chunk_symbols


def luna_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """The projections, the pack (P's learned queries) as two SDPA calls over
    [b, h, L, n] scores, the unpack as one over [b, h, n, L]."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    L = s.sym("L", p.l)
    pq = Cost(params=L * h * dh)  # P's queries, learned
    if env.causal:
        return causal_luna_cost(p, s, h, kv, dh, L, pq)
    scores = b * h * L * n
    core = Cost(params=pq.params, fwd=12 * scores * dh, bwd=30 * scores * dh, fwd_other=15 * scores,
                bwd_other=30 * scores)
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    cb = b * L * h * dh * by  # K~ or V~
    lse_l, lse_n = LSE_BYTES * b * h * L, LSE_BYTES * b * h * n
    saved = 2 * kvb + 2 * (cb + lse_l) + q + q + lse_n  # the unpack: q, K~, V~ (kept), its output, lse
    phases = [2 * kvb + 2 * cb + lse_l,  # the second pack
              q + 2 * cb + q + lse_n,  # the unpack
              q + out]  # at o_proj
    # backward: the unpack's gradients beside o's; the second pack's (P's queries, k's, v's) beside K~'s and the
    # input's, the unpack's saved tensors released; then the input's from v_proj, summed, beside k's and K~'s,
    # the second pack's saved tensors released too
    late = 2 * q + lse_n
    bwd = [2 * q + 2 * cb, out + 3 * cb + 2 * kvb - late, 3 * out + cb + kvb - (late + kvb + cb + lse_l)]
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=0, bwd_phases=bwd)



def causal_luna_cost(p, s: Symbols, h, kv, dh, L, pq: Cost) -> Cost:
    b, n, by = s.b, s.n, s.bytes
    C, m, N, several, padded = chunk_symbols(p, s)
    # FLOPs: the pack scores K P_q^T, then each pass's q k^T blocks [C, C] and their product with the values, the
    # chunks' states K^T V and the queries against the states before; backward twice each (every operand has a
    # gradient: P_q learned, the states summed from the keys and values even with one chunk)
    one = 2 * b * h * N * C * (dh + L) + 4 * b * h * N * dh * L  # one pass (dk + dv = dh + L, dk dv = dh L)
    fwd = 2 * b * h * n * dh * L + 2 * one
    # elementwise: the activation and scale of the pack scores, the unpack's scale and softmax (8 l); per pass the
    # blocks' mask, the states' cumulative sum, the sum of the two products; the division by t
    other = 8 * b * h * n * L + 2 * (b * h * m * C ** 2 + b * h * m * dh * L + b * h * N * (dh + L)) + b * h * n * dh
    core = Cost(params=pq.params, fwd=fwd, bwd=2 * fwd, fwd_other=other, bwd_other=2 * other)
    q, out = b * n * h * dh * by, b * n * s.d * by
    T, l, TL = b * h * N * dh * by, b * h * n * L * by, b * h * N * L * by
    R, Z, mask, t = b * h * m * C ** 2 * by, b * h * m * dh * L * by, C ** 2, n * by
    grouped = 0 if kv == h else 1  # k, v repeated to the query heads: contiguous, read in place
    unpadded = 1 - padded
    head = q + padded * (T - q)  # a chunked q, k or v: its padded copy, or its contiguous copy
    k_copy = head - grouped * unpadded * q  # k chunked (grouped, unpadded: the repeated k itself, kept already)
    small = padded * TL  # a chunked a or w: its padded copy (unpadded: the tensor itself)
    # kept: P_q^T for every sequence (the batched matmul's copy, b > 1), k for the pack scores (its copy; one sequence
    # or grouped heads: the tensor itself), the pack scores; pass 1: chunked q and k, a (or its padded copy), the
    # mask, the states before, the blocks; t's scale, w (the softmax's output); pass 2: chunked w and a (padded
    # copies), chunked v (grouped, unpadded: the repeated v), the mask, the states before, the blocks; t (the
    # division), o_proj's input (a copy)
    a_kept = unpadded * l + padded * TL
    saved = (sp.Min(1, b - 1) * b * L * h * dh * by + q + l
             + head + k_copy + a_kept + mask + Z + R + t + l
             + 2 * small + head + mask + Z + R + t + q)
    # inference: q, k, v (at h heads), a, t beside each pass at the sum of its two products (the chunked copies, the
    # mask, the blocks, the chunks' summed states and the states before, the two products, [b, h, N, dv] each), or
    # beside the unpack's softmax (pass 1's last state kept); pass 2 after q and k and pass 1's scores are released;
    # o_proj: pass 2's products (one of them released), o / t, its copy, the output, both last states
    first = 3 * q + l + t + head + k_copy + padded * TL + mask + R + 2 * Z + 2 * TL
    second = q + 2 * l + t + Z + 2 * small + k_copy + mask + R + 2 * Z + 2 * T
    softmax = 3 * q + l + t + Z + TL + 2 * l  # pass 1's scores (chunked: padded), scaled, and their softmax
    phases = [first, softmax, second, T + 2 * q + out + 2 * Z + t]
    # backward (pass 2's, where it peaks), o_proj's input copy and t released:
    # - at its blocks: the incoming gradient of its products (unpadded: o's gradient made contiguous, the division's
    #   gradient beside it; padded: the slice's zero-padded gradient, the division's released), the values' gradient
    #   through the blocks and the blocks' own;
    # - at its end (wide packs): the gradients of w (through the states and through the blocks) and of a (likewise)
    #   and v's, the states before, the mask and the values' chunked copy released; unpadded, w's two gradients are
    #   summed there (one more TL), the blocks and the contiguous v released; padded, the sum waits for the slice's
    #   backward;
    # - with several chunks, at its states: the cumulative sum's backward (a flip, a cumsum and a flip of the
    #   states' gradient) beside the slice's gradient and w's gradient through the states, o's gradient held
    bwd = [2 * T + R - t - padded * q,
           4 * TL + T + unpadded * TL - (q + t + Z + mask) - unpadded * (R + q) - padded * T,
           several * (TL + 3 * Z - t)]
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=2 * b * h * L * dh * by,
                          bwd_phases=bwd)
