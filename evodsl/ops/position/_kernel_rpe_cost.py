"""The cost of mha(linear) with pos(kernel_rpe) inside (_kernel_rpe_attention.py), symbols as
attention/_common.py's; F = dh features a head (elu + 1), e = dv + 1, c = F e columns of B.

FLOPs: B = phi(k) [v 1]^T (1 per element); the FFTs of B (rfft, length 2n), of the 2n coefficients and the inverse
(5/2 L log2 L per transform of length L, as mixer(fnet)'s), the spectra's product (6 per complex element); the
matmul phi(q_i)^T D_i (2 F e per position and head, the only matmul FlopCounterMode counts besides the
projections). Memory: B [b, h, n, c], its spectrum [b, h, n + 1, c] (complex: twice the
bytes) and the spectra's product, the inverse transform over 2n positions; O(n F dv), never n x n.
"""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols


def kernel_rpe_attention_cost(p, env, s: Symbols) -> Cost:
    from ..attention._common import attention_cost, head_symbols

    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    pos = env.pos[1]
    Fn = dh
    e = dh + 1
    c = Fn * e
    q, kvb = b * n * h * dh * by, b * n * kv * dh * by
    qkv = q + 2 * kvb
    QF, E = b * h * n * Fn * by, b * h * n * e * by
    B, X, P = b * h * n * c * by, b * h * (n + 1) * c * 2 * by, b * h * 2 * n * c * by  # B, its spectrum, 2n rows
    fft = sp.Rational(5, 2) * 2 * n * sp.log(2 * n, 2)
    other = b * h * n * c + 2 * fft * b * h * c + fft * h + 6 * b * h * (n + 1) * c + 2 * b * h * n * e
    core = Cost(fwd=2 * b * h * n * Fn * e, bwd=4 * b * h * n * Fn * e, fwd_other=other, bwd_other=2 * other)
    small = 4 * h * n * by + 2 * h * (n + 1) * by  # e^b of the distances, the 2n coefficients, their spectrum
    # kept: the feature map's inputs (q, k), phi(q) and phi(k) at every query head, [v 1], B padded to 2n, both
    # spectra, D (for phi(q)^T D), the numerator and denominator, o_proj's copy of the output
    saved = q + kvb + 2 * QF + E + small + P + X + B + b * h * n * by + E + q
    phases = [qkv + 2 * QF + E + B + small + 2 * X + P,  # the inverse transform
              qkv + 2 * QF + E + 2 * B + P + E]  # phi(q)^T D
    # backward: the inverse transform's gradient (a transform: the spectrum, its product) beside the padded
    # gradient and B's
    return attention_cost(p, s, h, kv, dh, core, Cost(params=h * (2 * pos.max_len - 1)), saved, phases,
                          cache=b * h * n * (Fn + e) * by,
                          bwd_phases=[2 * X + P + B])
