"""The cost of mha(clustered) (clustered.py): one dense form, eager and exported; topk=k > 0 the improved form
(_clustered_topk.py)."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import LSE_BYTES, attention_cost, head_symbols


def clustered_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """The projections; the hash (q W: [b, h, n, B]); the initial centroids (a one-hot pick [C, n] of the codes);
    L Lloyd iterations (the [n, C] similarities of the codes and the centroids, the votes S^T codes) and a last
    assignment; the centroid means S^T q, SDPA of the C centroids over the n keys (the fused kernel), the outputs
    S O^c. Every matmul grows as n C: the class is n for a fixed C."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    C, B, L = s.sym("C", p.clusters), s.sym("B", p.bits), s.sym("L", p.iterations)
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    bhnC = b * h * n * C
    clustering = 2 * b * h * n * dh * B + (4 * L + 4) * bhnC * B
    if p.topk:
        return improved_cost(p, s, h, kv, dh, C, B, L, clustering)
    core = Cost(fwd=clustering + 8 * bhnC * dh, bwd=14 * bhnC * dh,
                fwd_other=5 * bhnC + 3 * b * h * n * B + (L + 1) * (3 * bhnC + 2 * b * h * C * B),
                bwd_other=10 * bhnC + 2 * b * h * C * dh)
    S = bhnC * by  # the one-hot assignment
    codes = b * h * n * B * by
    qc = b * h * C * dh * by  # the centroid queries; their outputs
    lse = LSE_BYTES * b * h * C
    cnt = b * h * C * by
    keep = b * n * by  # the token mask (ones without padding)
    mu = b * h * C * B * by  # the centroids; the votes
    # kept: S (the means' and the outputs' matmuls), the counts (the division), SDPA's q^c, k, v, o^c and
    # logsumexp, o_proj's input
    saved = S + cnt + 2 * qc + 2 * kvb + lse + q
    qkv = q + 2 * kvb + keep
    # a Lloyd assignment: the new S and its int64 one-hot beside the codes and the centroids; after an update, the
    # last S and the votes too
    phases = [qkv + codes + mu + 3 * S + sp.Min(L, 1) * (S + mu),
              qkv + 2 * codes + codes / 4,  # the hash: q W, its sign, the codes
              qkv + S + 2 * qc + 2 * q + out]  # at o_proj: S O^c and its copy, beside q^c and o^c
    # backward: o_proj's input's gradient; SDPA's (those of q^c, o^c, k, v: o_proj's input released)
    bwd = [q, 2 * qc + 2 * kvb - q]
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=0, bwd_phases=bwd)


def improved_cost(p, s: Symbols, h, kv, dh, C, B, L, clustering) -> Cost:
    """The clustering and the centroid means as above; then the centroids' scores Q^c K^T [C, n] and A^c over the
    n + k columns (k padding), the top k, the rest A^c V [C, dh], each query's k gathered keys and values (from K, V
    zero-padded to n + k) [n, k, dh], its k scores and their softmax, the exact part times the mass and plus the
    rest (S m, S rest: matmuls with the one-hot S). Every term grows as n C or n k: the class is n."""
    b, n, by = s.b, s.n, s.bytes
    k = s.sym("k", p.topk)
    bhnC, bhnk, bhC = b * h * n * C, b * h * n * k, b * h * C
    core = Cost(fwd=clustering + 8 * bhnC * dh + 2 * bhnC + 4 * bhnk * dh,
                bwd=12 * bhnC * dh + 2 * bhnC + 8 * bhnk * dh,
                fwd_other=5 * bhnC + 3 * b * h * n * B + (L + 1) * (3 * bhnC + 2 * b * h * C * B)
                + 6 * bhC * (n + k) + 7 * bhnk + 3 * b * h * n * dh,
                bwd_other=10 * bhnC + 2 * b * h * C * dh + 12 * bhC * (n + k) + 10 * bhnk + 6 * b * h * n * dh)
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    S, codes, mu = bhnC * by, b * h * n * B * by, bhC * B * by
    qc, cnt, keep = bhC * dh * by, bhC * by, b * n * by
    cols = bhC * (n + k) * by  # A^c (and its scattered copy): the n + k columns
    top, idx = 8 * bhC * k, 8 * bhnk  # int64 indices: each cluster's top k, each query's k
    pad = b * kv * (n + k) * dh * by  # K, V zero-padded (the gathers keep them)
    sel = bhnk * dh * by  # the gathered keys (and values)
    w = bhnk * by  # each query's k scores (and weights, the real-key mask)
    small = 2 * bhC * by + b * h * n * by  # the masses, S m
    # kept: S, the counts, q^c, K and V, A^c and its scattered copy, the indices, the padded K and V, the gathered
    # keys and values, q's copy, the key mask, the weights, the exact part, o_proj's input
    saved = S + cnt + qc + 2 * kvb + 2 * cols + top + idx + 2 * pad + 2 * sel + q + w + w / 4 + q + small + q
    qkv = q + 2 * kvb + keep
    base = qkv + S + qc
    # inference: the improved form's locals live to its end (scores, A^c, the indices, the padded and gathered K and
    # V, the scores and weights, the exact part) beside its last sum (the scaled exact part, S rest, their sum)
    locals_ = 2 * cols + top + 8 * b * h * n + idx + 2 * pad + 2 * sel + 3 * w + q + 2 * bhC * by + bhC * dh * by
    phases = [qkv + codes + mu + 3 * S + sp.Min(L, 1) * (S + mu),
              qkv + 2 * codes + codes / 4,
              base + locals_ + 3 * q,
              base + 2 * q + out]
    # backward: o_proj's input's gradient; at the exact part's product with the values, the gradients of the gathered
    # values and of the weights beside those of the rest and the masses, S m and the exact part released
    bwd = [q, sel + w + qc + cnt - b * h * n * by - q]
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=0, bwd_phases=bwd)
