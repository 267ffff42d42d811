"""The cost of mha(yoso) (yoso.py): the sample form (hashes, bucket tables) and the expectation form ([n, n]
weights per head)."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import attention_cost, head_symbols

CODE_BYTES = 8  # the bucket codes are int64 (scatter_add's and gather's indices)
FLOAT32 = 4  # the sign bits and their sums are float32 whatever the dtype (integers below 2^16 exact)


def yoso_cost(p, env: OpEnv, s: Symbols) -> Cost:
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    norms = b * h * n * by  # one l2 norm per query row (and its clamp)
    if p.mode == "expectation":
        return _expectation(p, s, h, kv, dh, q, kvb, out, norms)
    m, tau = s.sym("m", p.hashes), s.sym("tau", p.tau)
    # hashing: [rows, dh] x [dh, m tau] for the h n query rows and the kv n key rows; codes from the sign bits
    hashing = Cost(fwd=2 * b * (h + kv) * n * dh * m * tau, fwd_other=3 * b * (h + kv) * n * m * tau)
    # the tables: every key adds its value into m buckets, every query reads m back and sums them; N
    tables_flops = Cost(fwd_other=b * (kv + h) * n * m * dh + 3 * b * h * n * dh,
                        bwd_other=b * (kv + h) * n * m * dh + 6 * b * h * n * dh)
    # no gradient reaches q and k (the codes are piecewise constant): q_proj's and k_proj's backward never run
    none = Cost(bwd=-4 * b * n * s.d * (h + kv) * dh, bwd_other=-b * n * (h + kv) * dh if p.bias else 0)
    T = b * kv * m * 2 ** tau * dh * by  # the bucket tables
    ck, cq = b * kv * n * m * CODE_BYTES, b * h * n * m * CODE_BYTES
    pk, pq = b * kv * n * m * tau * by, b * h * n * m * tau * by  # the projections on the hyperplanes
    bk, bq = b * kv * n * m * tau, b * h * n * m * tau  # their signs (bool), then as float32 bits (4 bytes)
    ckf, cqf = b * kv * n * m * FLOAT32, b * h * n * m * FLOAT32  # the codes summed in float32
    # kept: the key and query codes (scatter_add's, gather's), the tables (gather's), N's input and norms,
    # o_proj's input (a copy)
    saved = ck + cq + T + q + 2 * norms + q
    base = q + 2 * kvb  # q, k, v
    phases = [2 * q,  # q's copy beside q_proj's output
              base + kvb + pk, base + pk + bk,  # the keys' hashing (a contiguous copy of k), the signs
              base + bk + FLOAT32 * bk, base + 2 * FLOAT32 * bk,  # the float bits, their weighted copy
              base + FLOAT32 * bk + ckf + 2 * ck,  # the codes
              base + ck + 2 * T + m * kvb,  # scatter_add: the zero tables, the values repeated m times
              base + ck + T + pq + bq, base + ck + T + bq + FLOAT32 * bq,  # the queries' hashing
              base + ck + T + 2 * FLOAT32 * bq, base + ck + T + FLOAT32 * bq + cqf + 2 * cq,
              base + ck + T + cq + m * q + q,  # the gathered buckets and their sum
              base + 2 * q + norms,  # N
              base + 2 * q + out]  # at o_proj
    # backward: the sum's gradient over the m rounds expanded and copied for gather's backward, then the tables'
    # gradient (zeros, then scatter_add), N's input and o_proj's released by then; the projections: V's gradient
    # and the input's (no q or k gradient), everything kept released
    g = h / kv  # each K/V head's tables expanded to its g query heads for gather: its backward's zeros are g T
    bwd = [m * q + 2 * g * T - 2 * q - 2 * norms] + ([m * q] if p.kv_heads == 1 else [])  # one K/V head: measured
    #                                               with nothing released yet (autograd's order of the nodes)
    return attention_cost(p, s, h, kv, dh, hashing + tables_flops + none, Cost(), saved, phases, cache=0,
                          bwd_phases=bwd, projections_bwd=kvb + out - saved)


def _expectation(p, s: Symbols, h, kv, dh, q, kvb, out, norms) -> Cost:
    b, n, by = s.b, s.n, s.bytes
    pairs = b * h * n * n
    S = pairs * by  # one [b, h, n, n] tensor
    core = Cost(fwd=4 * pairs * dh, bwd=8 * pairs * dh, fwd_other=6 * pairs + 3 * b * h * n * dh,
                bwd_other=12 * pairs + 6 * b * h * n * dh)
    kn = b * kv * n * by
    # kept: q and k, their norms, their unit vectors; x (Collision's), E (the matmul's) and v; N's input and
    # norms; o_proj's input. With K/V groups, k^ and v expanded to the g query heads of their group are copied by
    # the matmuls, which keep the copies (g kvb = q each) in place of k^ and v
    grouped = q - kvb if kv != h else 0
    saved = 4 * q + 3 * kvb + 2 * S + 4 * norms + 2 * kn + 2 * grouped
    base = q + 2 * kvb
    # the matmul's operands, copied to fold their batch dimensions: q^ (a strided view of q_proj's output) when
    # b > 1; k^ expanded to the g heads of its group, or with g = 1 when b > 1 (a strided view of k_proj's)
    fold = sp.Min(1, b - 1)
    copies = fold * q + (q if kv != h else fold * kvb)
    phases = [2 * q, base + q + kvb + copies + S, base + 2 * q + norms, base + 2 * q + out]
    # backward: E's gradient and Collision's two temporaries, E, N's input and o_proj's released (and v's copy)
    bwd = [2 * S - 2 * q - 2 * norms - grouped]
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=0, bwd_phases=bwd)
