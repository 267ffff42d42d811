"""The cost of mha(linear) / mha(performer) with pos(permute) inside (_permute_attention.py), symbols as
attention/_common.py's; F features per head (linear: dh; performer: m), e = dv + 1 (the values and the
denominator's column of ones).

- performer: the logits W x' of q and k (W has no gradient: their backward is 1x), their exp;
- the powers σ^t [h, n, F] (int64) and the two gathers of phi(q), phi(k) (k repeated to every query head);
- bidirectional: phi(K)^T [V 1] and phi(Q) times it, per query head;
- causal, in chunks of C = min(64, n) over N = ceil(n / C) C positions (_chunked_linear.chunked_decay): the [C, C]
  blocks phi(Q) phi(K)^T times the decay ratios, A [V 1], each chunk's state phi(K)^T [V 1] and phi(Q) S.
"""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols


def permute_attention_cost(p, env, s: Symbols) -> Cost:
    from ..attention._common import attention_cost, head_symbols

    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    performer = hasattr(p, "features")
    Fn = s.sym("m", p.features) if performer else dh
    e = dh + 1
    q, kvb = b * n * h * dh * by, b * n * kv * dh * by
    qkv = q + 2 * kvb
    feat = Cost()
    if performer:
        logits = 2 * b * n * (h + kv) * dh * Fn
        feat = Cost(fwd=logits, bwd=logits, fwd_other=b * n * (h + kv) * (4 * Fn + 2 * dh),
                    bwd_other=2 * b * n * (h + kv) * (4 * Fn + 2 * dh))
    QF, KF, E = b * h * n * Fn * by, b * kv * n * Fn * by, b * h * n * e * by
    grouped = p.kv_heads not in (None, p.heads)
    idx = 8 * h * n * Fn  # the powers σ^t, int64
    out = b * n * s.d * by
    # kept for backward: the feature map's inputs (q, k), phi(q), phi(k) at every query head (performer: at the K/V
    # heads, repeated when grouped; W scaled), the powers, o_proj's copy of the output
    feats = q + kvb + QF + (KF + (QF if grouped else 0) + 2 * Fn * dh * by if performer else QF)
    alive = KF + Fn * dh * by if performer else 0  # performer: phi(k) at the K/V heads and W scaled, kept by name
    if env.causal:
        C = sp.Min(64, n)  # the chunk of mha(linear) and mha(performer)
        N = sp.ceiling(n / C) * C
        m = N / C
        QN, EN = b * h * N * Fn * by, b * h * N * e * by
        padded = sp.Min(1, N - n)  # the last chunk padded: q, k, [v 1] and g copied
        fwd = 2 * b * h * N * C * (Fn + e) + 4 * b * h * N * Fn * e
        other = 3 * b * h * N * C + 2 * b * h * N * Fn
        many = sp.Min(1, m - 1)  # more than one chunk: states with a gradient before the later chunks
        # one chunk: its state feeds nothing (no gradient: its matmul's backward is skipped), nor does the zero
        # state before it (q exp(B) S: only q's gradient)
        bwd = 2 * fwd - (1 - many) * 6 * b * h * C * Fn * e
        # the chunked phi(q), phi(k) (padded copies when n is not a multiple of C), k exp(B_C - B) (and, with
        # more than one chunk, q exp(B) for the states' gradient), [v 1], the decays exp(B), exp(B_C - B) [N], the
        # ratios and A [C, C] a chunk, the states before each chunk, the numerator and denominator
        kernel = idx + (3 + many) * QN + 2 * b * h * N * C * by + 2 * b * h * N * by + (1 + many) * EN + \
            m * b * h * Fn * e * by + b * h * m * by + b * h * n * by
        phases = [qkv + alive + idx + 2 * QF + E + padded * (2 * QN + EN + b * h * N * by) + b * h * N * by + C ** 2
                  + 2 * b * h * N * C * by + 2 * QN + (2 * m + 1) * b * h * Fn * e * by + 3 * EN,  # o in the chunks
                  qkv + alive + idx + 2 * QF + E + EN + 2 * q + out]  # at o_proj
    else:
        fwd = 4 * b * h * n * Fn * e
        other = 2 * b * h * n * e
        bwd = 2 * fwd
        # the gathered phi(q), phi(k), [v 1], the sums [S z], the numerator and denominator
        kernel = idx + 2 * QF + 2 * E + b * h * Fn * e * by + b * h * n * by
        phases = [qkv + alive + idx + 2 * QF + 2 * E + 2 * q + out]  # at o_proj
    core = feat + Cost(fwd=fwd, bwd=bwd, fwd_other=other, bwd_other=2 * other)
    # backward: o_proj's input gradient beside those of the three projections' inputs
    return attention_cost(p, s, h, kv, dh, core, Cost(), feats + kernel + q, phases,
                          cache=b * h * Fn * e * by + (b * kv * by if performer else 0), bwd_phases=[q + 3 * out])
