"""The cost of mha(softmax) with pos(deberta) inside (_deberta_attention.py), symbols as attention/_common.py's.

Over W = 2 min(n, k) table rows: their lookup, the two projections (Kr, Qr; share=true: the layer's k_proj and
q_proj on them), c2p = q Kr^T [b, h, n, W] and p2c = k Qr^T [b, h, n, W], gathered at δ into [b, h, n, n] and
summed (terms=c2p or p2c: one of them): SDPA's float mask, which has a gradient, so in training SDPA runs its
math kernel.
"""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..cost import Cost, Symbols, linear


def deberta_attention_cost(p, env, s: Symbols) -> Cost:
    from ..attention._common import attention_cost, head_symbols

    pos = env.pos[1]
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    D, W = h * dh, 2 * sp.Min(n, pos.k)
    scores = b * h * n ** 2
    drop_kbias = p.bias and not pos.key_bias
    c2p, p2c = int(pos.terms in ("both", "c2p")), int(pos.terms in ("both", "p2c"))
    T = c2p + p2c
    if pos.share:  # the layer's own k_proj and q_proj on the W rows
        rel = (linear(s, D, kv * dh, p.bias and not drop_kbias, tokens=W).scaled(c2p)
               + linear(s, D, D, p.bias, tokens=W).scaled(p2c))
        rel = replace(rel, params=0)
    else:
        rel = linear(s, D, D, False, tokens=W).scaled(c2p) + linear(s, D, D, True, tokens=W).scaled(p2c)
    q, kvb, full_k = b * n * D * by, b * n * kv * dh * by, b * n * D * by
    terms = Cost(fwd=T * 2 * b * h * n * W * dh, bwd=T * 4 * b * h * n * W * dh, fwd_other=b * n * D + p2c * W * D
                 + (2 * T - 1) * scores, bwd_other=2 * (b * n * D + p2c * W * D + (2 * T - 1) * scores))
    core = Cost(fwd=4 * scores * dh, bwd=8 * scores * dh, fwd_other=5 * scores, bwd_other=10 * scores)
    keep = n ** 2 if env.causal else 0  # the bool causal mask
    delta, mb, wide = 8 * n ** 2, max(by, 4), b * h * n * W * by  # the int64 δ; the math kernel's float32; c2p/p2c
    dropout = p.dropout > 0  # training: the math kernel's float mask and the dropped weights
    # saved: the rows' indices and the rows (the projections' input), Kr and Qr copied for the batched matmuls,
    # scaled q and k (with every query head) for them, δ, c2p and p2c before their gathers (gather keeps its
    # input), the causal mask; the math kernel's scaled q, k, v (query heads) and weights; o_proj's copy of o
    saved = (8 * W + W * D * by + T * b * D * W * by + c2p * q + p2c * full_k + delta + T * wide + keep
             + (3 * b * n * D + scores * (1 + 2 * dropout)) * mb + q)
    # inference: scaled q, k, v, the rows projected, p2c before its gather beside both gathered terms and δ
    phases = [q + 2 * kvb + T * scores * by + wide + delta + T * W * D * by + 16 * W]
    # backward: a gather's gradient (zeros, then scattered into: 2 [b, h, n, W]) beside those of k and v (K/V
    # heads), the math kernel's weights and masks released; the math kernel's own: the weights' gradient and the
    # scores' (with dropout: v's and the dropped weights')
    bwd = [2 * wide + 2 * kvb - 3 * q - keep - 2 * dropout * scores * mb, q + scores * mb if dropout else 2 * scores * mb - q]
    if p2c and not c2p and env.causal:  # the mask, masked in place, is p2c's transposed view: its gradient is
        bwd.append(3 * scores * mb + 2 * kvb - 3 * q - 2 * dropout * scores * mb)  # made contiguous for the gather
    cost = attention_cost(p, s, h, kv, dh, core + terms + rel, Cost(), saved, phases,
                          cache=2 * b * n * kv * dh * by, bwd_phases=bwd)
    if drop_kbias:  # DeBERTa's attention has no key bias
        return replace(cost, params=cost.params - kv * dh, bwd_other=cost.bwd_other - b * n * kv * dh)
    return cost
