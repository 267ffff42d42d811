"""The cost of mha(scatterbrain) (scatterbrain.py): one form, eager and exported."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import attention_cost, head_symbols


def scatterbrain_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """The projections; the feature logits of q and k (m x dh per position and head; W has no gradient, so their
    backward is 1x); the low-rank sums (_kernelized.bidirectional); one SMYRF round's hash (XBOX+ at the query
    heads, no gradient) and sort; in the C clusters of L = ceil(n/C) + 1 slots (the last masked) the scores and
    the feature products ([b, h, C, L, L] each), the correction S and S [v 1]; the outputs gathered back, the
    low-rank part scaled in, the division. The cluster matmuls grow as n L = n^2 / C: quadratic for a fixed C;
    the sort's n log n comparisons are counted outside them (fwd_other)."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    C, m = s.sym("C", p.clusters), s.sym("m", p.features)
    L = sp.ceiling(n / C) + 1  # smyrf.cluster_length
    grouped = p.kv_heads not in (None, p.heads)
    Q, K, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    e = dh + 1  # v and its column of ones
    slots = b * h * C * L
    sc = slots * L
    logits = 2 * b * n * (h + kv) * dh * m
    low = 2 * b * n * (h + kv) * m * e
    sparse = 2 * sc * (dh + m + e)
    hashing = 4 * b * h * n * (dh + 2)
    sort = 2 * b * h * n * sp.log(n, 2)
    core = Cost(fwd=logits + low + sparse + hashing, bwd=logits + 2 * low + 2 * sparse,
                fwd_other=b * n * (h + kv) * (4 * m + 2 * dh) + 10 * sc + 4 * b * h * n * e + sort,
                bwd_other=20 * sc + 8 * b * h * n * e)
    Fq, Fk = b * h * n * m * by, b * kv * n * m * by  # the features
    W = m * dh * by  # W scaled
    E = b * h * n * e * by  # [num den] per query: the low-rank part, the correction, their sum
    S, sl, sm, se, sb = sc * by, slots * dh * by, slots * m * by, slots * e * by, slots * by
    bhn = b * h * n * by  # one number per query: the constants
    vh = Q if grouped else K  # k and v at the query heads (copies when grouped)
    fh = Fq if grouped else 0  # phi(k) at the query heads: a copy when grouped
    lay = 8 * (C * L + n) + C * L  # the cluster layout (smyrf.cluster_slots)
    idx = 8 * b * h * n  # int64 per query: a sorted order, its inverse, each query's slot
    # kept: W scaled (twice), q and k made contiguous for the logits, the features, [v 1] and the sums (at the query
    # heads); the slot indices, q and k at the query heads (the gathers), the scaled queries and keys, two masks,
    # phi(k) at the query heads, the sorted features, exp(s - c) and its features' scale, v at the query heads, S
    # and [v 1] sorted, the row index, the outputs in slots, the low-rank scale, [num den], o_proj's input
    saved = (2 * W + Q + K + Fq + Fk + b * kv * n * e * by + b * h * m * e * by + 16 * slots + Q + vh + 2 * sl
             + 2 * C * L + fh + 2 * sm + S + sb + vh + S + se + idx + se + bhn + E + Q)
    base1 = Q + 2 * K + Fq + Fk + bhn + E  # q, k, v, the features, their constants, the low-rank part
    base2 = base1 + (2 * Q + Fq if grouped else 0)  # k, v, phi(k) at the query heads
    base3 = base2 + 2 * idx + lay + 16 * slots  # the sorted orders, the layout, the slot indices
    base4 = base3 + S + 2 * sb  # the masked scores, the per-query constants in slots
    phases = [Q + 2 * K + 2 * Q + Fq + bhn,  # phi(q): q's copy, x * x, the logits
              Q + 2 * K + Fq + 2 * K + Fk + b * kv * n * by,  # phi(k)
              Q + 2 * K + Fq + Fk + bhn + b * kv * n * e * by + b * kv * m * e * by,  # [v 1] and the sums
              base1 - E + b * h * m * e * by + E,  # the low-rank part
              base2 + 2 * b * h * n * (dh + 2) * by + 3 * bhn + 2 * idx,  # the hash: XBOX+ transforms and sorts
              base3 + 2 * sl + S, base3 + 2 * S + C * L,  # the scores, masked
              base4 + 2 * sm + S,  # the features' products
              base4 + 4 * S,  # S = exp(s - c) - phi.phi scaled
              base4 + 2 * S + 2 * se,  # S [v 1]
              base4 + 2 * S + se + 2 * idx + E + bhn,  # the outputs gathered back
              Q + 2 * K + Fq + Fk + 3 * bhn + 4 * E,  # the parts combined
              Q + 2 * K + Fq + Fk + 3 * bhn + 3 * E + 2 * Q + out]  # at o_proj
    # backward: the division (the gradients of the numerator, the denominator and their product); the outputs
    # scattered into slots; the features' products (the sorted features' gradients, with the outputs in slots, [v 1]
    # sorted, their row index, v at the query heads, a mask and the constants released)
    bwd = [4 * Q, 2 * se, 2 * sm - idx - 2 * se - vh - C * L - sb - bhn]
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=0, bwd_phases=bwd)
