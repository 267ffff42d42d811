"""The cost of mha(smyrf) (smyrf.py): one form, eager and exported, every round over its C clusters."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import LSE_BYTES, attention_cost, head_symbols


def smyrf_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """The projections (K/V repeated to the query heads); the XBOX+ transforms and their E2LSH projections
    ([b, h, n, dh + 2] x [dh + 2, R], no gradient) and the sorts; per round the queries, keys and values gathered
    into C clusters of L = ceil(n/C) + 1 slots (the last masked), attention over [b, h, R, C, L, L] scores: one
    round, SDPA's fused kernel; several, an explicit softmax and logsumexp, the rounds' outputs gathered back and
    combined. The matmuls grow as R n L = R n^2 / C: quadratic for a fixed C; the sort's R n log n comparisons are
    counted outside them (fwd_other)."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    C, R = s.sym("C", p.clusters), s.sym("R", p.rounds)
    L = sp.ceiling(n / C) + 1  # smyrf.cluster_length
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    slots = b * h * R * C * L
    scores = slots * L
    hashing = 4 * b * h * n * (dh + 2) * R
    sort = 2 * b * h * R * n * sp.log(n, 2)
    other = 3 * b * h * R * n * dh + 10 * b * h * n * (dh + 2) + sort  # the gathers, the transforms, the sort
    S, sl = scores * by, slots * dh * by  # the scores (weights, exponentials); q, k or v in cluster slots
    vh = q if kv != h else kvb  # k and v at the query heads (repeated for grouped K/V heads: copies)
    rows = b * h * R * n * dh * by  # the rounds' outputs at the original positions
    small = b * h * R * n * by  # their logsumexps (and the rounds' weights)
    tok = 8 * b * h * R * n  # int64 per token and round: a sorted order, its inverse, each token's slot
    idx = 8 * slots  # int64 per slot: the token it holds
    lay = 8 * (C * L + n) + C * L  # the cluster layout: each slot's sorted place and validity, each place's slot
    hash_phase = q + 2 * vh + 2 * b * h * n * (dh + 2) * by + 4 * b * h * n * by + 2 * b * h * n * R * (by + 8)
    base = q + 2 * vh + 4 * tok + 2 * idx + lay  # q, k, v; the sorted orders, the inverse, the rows; the layout
    if p.rounds == 1:  # SDPA over the clusters (the fused kernel)
        core = Cost(fwd=4 * scores * dh + hashing, bwd=10 * scores * dh, fwd_other=5 * scores + other,
                    bwd_other=10 * scores)
        mask = 3 * h * C * L  # the mask at the query heads (bool)
        # kept: q, k, v (the gathers' inputs), the slot indices, SDPA's q, k, v, output and float32 logsumexp and
        # its mask, the row index, o_proj's input
        saved = q + 2 * vh + 2 * idx + 4 * sl + LSE_BYTES * slots + mask + tok + q
        phases = [hash_phase,
                  base + 4 * sl + LSE_BYTES * slots + mask,  # SDPA: the sorted q, k, v, its output
                  base + sl + rows,  # the outputs gathered back
                  q + 2 * vh + rows + q + out]  # at o_proj
        # backward: the outputs' gradient in slots and SDPA's of q, k, v (o_proj's input and the row index released)
        return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=0, bwd_phases=[4 * sl - q - tok])
    core = Cost(fwd=4 * scores * dh + hashing, bwd=8 * scores * dh, fwd_other=12 * scores + 2 * slots * dh + other,
                bwd_other=24 * scores + 4 * slots * dh)
    # kept: q, k, v (the gathers' inputs), the two slot indices, the scaled queries, keys and values (the matmuls),
    # the validity mask, the exponentials and their sums (the logsumexp), the weights, the outputs in slots and
    # the logsumexps (the gathers back, with their row index), the rounds' weights and outputs, o_proj's input
    saved = q + 2 * vh + 2 * idx + 4 * sl + C * L + 2 * S + 2 * slots * by + tok + small + rows + q
    phases = [hash_phase,
              base + 3 * S + slots * by,  # the logsumexp's exponentials beside the scores
              base + 2 * S + 2 * sl + 2 * slots * by,  # the weights times the values
              base + S + sl + 2 * slots * by + rows + small,  # the outputs gathered back
              q + 2 * vh + 3 * rows + 2 * small,  # the rounds combined
              q + 2 * vh + rows + small + 2 * q + out]  # at o_proj
    # backward: the rounds' combination (the gradients of their outputs and weights); the weights times the values
    # (the gradients of the outputs and of the values in slots; o_proj's input and the rounds' weights released)
    bwd = [2 * rows + small, 2 * sl - q - small]
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=0, bwd_phases=bwd)
