"""The cost of mha(clustered) (clustered.py): one dense form, eager and exported."""
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
