"""The cost of mha(softmax) with pos(huang) inside (_huang_attention.py), symbols as attention/_common.py's.

Over S = b h n^2 scores, R band offsets (method 3: 2k - 1, causal k) and F far matmuls (method 3: 2, causal 1):
- methods 1, 2: q k^T, times the table's entries gathered at δ [h, n, n], the softmax and the weighted sum;
- method 3: the band, R products q ⊙ k_{i+r} [b, h, n, dh] and their sums against a_r, stacked [b, h, n, R] and
  gathered into place; F matmuls (q ⊙ a_{±k}) k^T where |j - i| >= k; the softmax and the weighted sum;
- method 4: q A^T and k A^T against the 2k + 1 rows, gathered at δ and summed: SDPA's float mask, which has a
  gradient, so in training SDPA runs its math kernel.
The int64 positions i, j (n each) and δ [n, n] are alive until the scores are; causal, the bool mask [n, n].
"""
from __future__ import annotations

from dataclasses import replace

from ..cost import Cost, Symbols


def huang_attention_cost(p, env, s: Symbols) -> Cost:
    from ..attention._common import attention_cost, head_symbols

    pos = env.pos[1]
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    S, Sb, q = b * h * n ** 2, b * h * n ** 2 * by, b * n * h * dh * by
    qkv = q + 2 * b * n * kv * dh * by
    causal, grouped = env.causal, p.kv_heads not in (None, p.heads)
    keep = n ** 2 if causal else 0  # the bool causal mask
    kx = q if grouped else 0  # k repeated to every query head
    base = qkv + 16 * n + 8 * n ** 2 + keep + kx  # while the scores are formed: q, k, v, i, j, δ, the mask
    dropout = p.dropout > 0  # training: the dropout's bool mask and the dropped weights
    rows = b * h * n * (2 * pos.k + 1)  # method 4: q A^T, k A^T
    soft = [qkv + 16 * n + keep + 2 * Sb,  # the softmax (or the mask's fill) beside the scores
            qkv + 16 * n + keep + Sb + 2 * q + b * n * s.d * by]  # at o_proj: the weights, o and its copy
    if pos.method in (1, 2):
        core = Cost(fwd=4 * S * dh, bwd=8 * S * dh, fwd_other=8 * S, bwd_other=16 * S)
        saved = 4 * q + 2 * Sb + h * n ** 2 * by + 8 * n ** 2 + keep
        phases = [base + Sb + 8 * n ** 2 + 2 * h * n ** 2 * by, base + Sb + 2 * q, *soft]
        params = h * (pos.k + 1 if pos.method == 1 else 2 * pos.k + 1)
    elif pos.method == 3:
        R, F = (pos.k, 1) if causal else (2 * pos.k - 1, 2)
        band = b * h * n * R
        core = Cost(fwd=(2 * F + 2) * S * dh, bwd=(4 * F + 4) * S * dh,
                    fwd_other=3 * band * dh + F * (b * h * n * dh + S) + 7 * S,
                    bwd_other=2 * (3 * band * dh + F * (b * h * n * dh + S) + 7 * S))
        saved = (2 * F + 3 + 2 * R) * q + band * by + 8 * n ** 2 + F * n ** 2 + keep + 8 * n * R + Sb
        phases = [base + 2 * band * by + 2 * q, base + band * by + 8 * n ** 2 + Sb,
                  base + 2 * Sb + n ** 2 + 3 * q, base + 3 * Sb + n ** 2, *soft]
        params = (2 * pos.k + 1) * dh
    else:
        core = Cost(fwd=4 * S * dh + 4 * rows * dh, bwd=8 * S * dh + 8 * rows * dh, fwd_other=8 * S,
                    bwd_other=16 * S)
        saved = 6 * q + 2 * rows * by + Sb + 8 * n ** 2 + keep
        phases = [base + 8 * n ** 2 + 2 * Sb + rows * by, qkv + 16 * n + keep + Sb + q + b * n * s.d * by]
        params = (2 * pos.k + 1) * dh
    if dropout:
        saved += Sb + S
    # backward: the weights' gradient and the scores' ([b, h, n, n] each) beside the gradients of v and of k (K/V
    # heads), o_proj's copy and q released; method 3's bidirectional band also holds the gradient of k repeated to
    # every query head (index_select's) until it is summed
    kvb = b * n * kv * dh * by
    if pos.method in (1, 2) or (pos.method == 3 and causal):
        bwd = [2 * Sb - 2 * q + kvb]
    else:  # method 4 (SDPA's math kernel on k repeated) and method 3's bidirectional band
        bwd = [2 * Sb - q + (kvb if grouped and pos.method == 3 else 0)]
    cost = attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=2 * b * n * kv * dh * by,
                          bwd_phases=bwd)
    return replace(cost, params=cost.params + params)  # the layer's own table
