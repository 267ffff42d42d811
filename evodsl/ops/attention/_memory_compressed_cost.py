"""The cost of mha(memory_compressed) (memory_compressed.py): the forms torch runs at a known n (the export's
gathered form, _gathered, is not costed: tests/test_onnx.py CAUSAL_GROUPS)."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from ._common import LSE_BYTES, attention_cost, head_symbols


def memory_compressed_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """The projections, the two strided convolutions (a [K C, C] map per slot), then: bidirectional, SDPA over
    [b, h, n, M] scores (M = ceil(n/K) slots; the fused kernel); causal, the grouped
    form: explicit matmuls of the G = m + 1 groups of K queries (L = G K rows) against the m slots and their K raw
    tokens, [b, h, L, m + K] weights kept for backward."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    K = s.sym("k", p.k)
    C = kv * dh
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    qkv = q + 2 * kvb
    grouped = 2 * q if kv != h else 0
    if not env.causal:
        M = sp.ceiling(n / K)
        conv = linear(s, K * C, C, p.bias, tokens=b * M).scaled(2)
        padded = sp.Min(1, M * K - n) * b * M * K * C * by  # a partial last slot: K, V zero-padded (copies)
        kin = padded + (1 - sp.Min(1, M * K - n)) * kvb  # what each convolution keeps: its input
        slots = b * M * C * by
        scores = b * h * n * M
        lse = LSE_BYTES * b * h * n
        core = Cost(fwd=4 * scores * dh, bwd=10 * scores * dh, fwd_other=5 * scores, bwd_other=10 * scores)
        saved = 2 * kin + 2 * slots + 2 * q + lse  # the convolutions' inputs; SDPA's q, K~, V~, o, logsumexp
        phases = [qkv + padded + slots,  # a convolution
                  qkv + 2 * slots + q + lse,  # SDPA
                  qkv + q + out]  # at o_proj
        bwd = [2 * q + 2 * slots]  # o's gradient and those of q, K~, V~
        return attention_cost(p, s, h, kv, dh, conv + core, Cost(), saved, phases, cache=0, bwd_phases=bwd)
    m = sp.floor(n / K)
    L = (m + 1) * K  # G = m + 1 groups of K rows
    conv = linear(s, K * C, C, p.bias, tokens=b * m).scaled(2)
    qL = b * h * L * dh * by  # the padded, grouped queries; the raw keys and values; the output rows
    slots = b * m * (h if kv != h else kv) * dh * by  # K~ (V~), repeated to h heads for grouped K/V heads
    W = b * h * L * (m + K) * by  # the weights [b, h, G, K, m + K]
    mask = L * (m + K)  # bool
    scores = b * h * L * (m + K)
    core = Cost(fwd=4 * scores * dh, bwd=8 * scores * dh, fwd_other=6 * scores, bwd_other=12 * scores)
    copied = sp.Min(1, (b - 1) * sp.Mod(n, K))  # several rows cut short of n: each convolution's input is a copy
    cin = 2 * (copied * b * m * K * C * by + (1 - copied) * kvb)  # what the convolutions keep
    saved = 3 * qL + 2 * slots + W + mask + cin + q  # q, K, V grouped; K~, V~; the weights, the mask; o_proj's copy
    s1, s2 = b * h * L * m * by, b * h * L * K * by  # the scores against the slots and the raw tokens
    phases = [qkv + 2 * slots + 3 * qL + s1 + s2 + W,  # their concatenation
              qkv + 2 * slots + 3 * qL + grouped / 2,  # the raw values grouped (K/V heads repeated first)
              qkv + slots + qL + 2 * W,  # the softmax
              qkv + slots + qL + W + 2 * qL,  # the output rows
              qkv + qL + q + out]  # at o_proj
    # backward: the gradients of the two slices of the weights, laid into two full-size ones and summed (o's
    # gradient and V's, V~'s released; the values' gradients alive, as large as them)
    bwd = [3 * W - q]
    return attention_cost(p, s, h, kv, dh, conv + core, Cost(), saved, phases,
                          cache=2 * b * (m + sp.Mod(n, K)) * kv * dh * by, bwd_phases=bwd)
