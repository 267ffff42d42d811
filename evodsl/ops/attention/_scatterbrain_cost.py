"""The cost of mha(scatterbrain) (scatterbrain.py): one form, eager and exported."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols
from ..registry import OpEnv
from . import _kernelized as kern
from ._common import attention_cost, head_symbols


def scatterbrain_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """The projections; the feature logits of q and k (m x dh per position and head; W has no gradient, so their
    backward is 1x); the low-rank sums (_kernelized.bidirectional); one SMYRF round's hash (XBOX+ at the query
    heads, no gradient) and sort; in the C clusters of L = ceil(n/C) + 1 slots (the last masked) the scores and
    the feature products ([b, h, C, L, L] each), the correction S and S [v 1]; the outputs gathered back, the
    low-rank part scaled in, the division. The cluster matmuls grow as n L = n^2 / C: quadratic for a fixed C;
    the sort's n log n comparisons are counted outside them (fwd_other)."""
    if env.causal:
        return _causal_cost(p, env, s)
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


def _causal_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """The causal form (_scatterbrain_local.py): the feature logits; the low-rank prefix sums in chunks
    (_kernelized.causal, at the query heads); the window in G = ceil(n/w) + 1 blocks of w queries against 2w keys:
    the scores and the feature products ([b, h, G, w, 2w] each), the correction S and S [v 1]; the division."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    w, m = s.sym("w", p.window), s.sym("m", p.features)
    grouped = p.kv_heads not in (None, p.heads)
    Q, K, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    e = dh + 1
    G = sp.ceiling(n / w) + 1
    slots = b * h * G * w
    sc = slots * 2 * w
    logits = 2 * b * n * (h + kv) * dh * m
    Fq, Fk = b * h * n * m * by, b * kv * n * m * by
    kernel = kern.kernel_cost(s, env, h, kv, dh, m, Fq, Fk, grouped, 64, positive=True)
    low = kernel.flops
    local = 2 * sc * (dh + m + e)
    core = Cost(fwd=logits + local, bwd=logits + 2 * local,
                fwd_other=b * n * (h + kv) * (4 * m + 2 * dh) + 10 * sc + 4 * b * h * n * e, bwd_other=20 * sc) + low
    c = sp.Min(64, n)  # the prefix sums' chunk (scatterbrain.py)
    N = sp.ceiling(n / c) * c
    padded = sp.Min(1, N - n)
    fN, oN = b * h * N * m * by, b * h * N * e * by  # features, [v 1] and [num den] at the chunked length
    fq_c, fk_c = fN * padded, fN * (1 if grouped else padded)  # phi(q) padded; phi(k) repeated or padded
    states = b * h * N / c * m * e * by  # [S z] before every chunk
    a = b * h * N * c * by  # the chunks' C x C products
    W = m * dh * by
    E, sb = b * h * n * e * by, slots * by
    S, sl, sm, se = sc * by, slots * dh * by, slots * m * by, slots * e * by  # S: [w, 2w] a block
    bhn = b * h * n * by
    ok = 2 * G * w * w  # the window's mask (bool)
    # kept: W scaled (twice), q and k made contiguous for the logits, the features; the prefix sums' copies, mask, C x
    # C products, states and [v 1]; the window's indices, q scaled and k (2w a block), two masks, the sorted
    # features, exp(s - c) and its features' scale, [v 1] (2w a block), S; the low-rank scale, [num den], its
    # clamped denominator, o_proj's input
    saved = (2 * W + Q + K + Fq + Fk + fq_c + fk_c + c ** 2 + oN + states + a + 24 * G * w + 3 * sl + 2 * ok
             + 3 * sm + 2 * S + sb + 2 * se + 2 * bhn + E + Q)
    basef = Q + 2 * K + Fq + Fk + bhn  # q, k, v, the features and their constants
    base2 = basef + oN + (2 * Q + Fq if grouped else 0)  # the low-rank part; k, v, phi(k) at the query heads
    base3 = base2 + 48 * G * w + ok  # the window's indices and mask
    base4 = base3 + S + 2 * sb  # the masked scores, the per-query constants
    phases = [Q + 2 * K + 2 * Q + Fq + bhn,  # phi(q): q's copy, x * x, the logits
              Q + 2 * K + Fq + 2 * K + Fk + b * kv * n * by,  # phi(k)
              basef + (fN if grouped else 0) + fq_c + fN * padded + c ** 2 + a + states + 3 * oN,  # the prefix sums
              base3 + 3 * sl + S, base3 + 2 * S + ok,  # the scores, masked
              base4 + 3 * sm + S,  # the features' products
              base4 + 4 * S,  # S = exp(s - c) - phi.phi scaled
              base4 + 2 * S + 2 * sl + 2 * se,  # [v 1] (2w a block) beside S
              basef + oN + se + sb + bhn + 2 * E,  # the parts combined
              basef + oN + se + sb + bhn + E + 2 * Q + out]  # at o_proj
    # backward: the division (the gradients of the numerator, the denominator and their product); S [v 1] (the
    # gradients of S and of [v 1], o_proj's input and [num den] released); exp(s - c)'s (beside v's gradient at the
    # query heads); the features' products (the gradients of the sorted features, S and [v 1] released)
    bwd = [4 * Q, 3 * se + S - E - bhn, Q + 2 * S - E - bhn - 2 * se, 3 * sm - E - bhn - 2 * se + Q - sb - ok]
    cache = 2 * b * kv * sp.Min(w - 1, n) * dh * by + b * kv * (m * e + 1) * by
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=cache, bwd_phases=bwd)
