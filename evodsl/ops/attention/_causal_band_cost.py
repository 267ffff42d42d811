"""The cost of _banded._causal_band: a causal band of lo + 1 keys, as a prefix of P = min(n, lo + 1) queries in
one causal SDPA call, then blocks of B queries against B + lo keys (the last one r < B queries).

Scores per (sequence, head): I = P^2 + nf B (B + lo) + r (r + lo), nf = floor((n - P) / B), r = n - P - nf B
(FlopCounterMode counts a causal SDPA call's whole P x P square, as these formulas do)."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import LSE_BYTES, AttentionParams, attention_cost, head_symbols, position_cost, rotates, score_bias


def causal_band_cost(p: AttentionParams, env: OpEnv, s: Symbols, lo, bias=None, cache_keys=None) -> Cost:
    from ._banded import POSITION_BIAS, band_block

    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    B = band_block(int(sp.sympify(lo).subs(s.values)), 0)
    P = sp.Min(n, lo + 1)
    rest = n - P
    nf = sp.floor(rest / B)
    r = rest - nf * B
    blocks = sp.Min(1, rest)  # 1 when any query is past the prefix
    I = P ** 2 + nf * B * (B + lo) + r * (r + lo)
    if score_bias(env):  # the position scheme's bias on the band, alone or added to the variant's own
        bias = POSITION_BIAS if bias is None else bias.plus_position()
    pos = Cost() if score_bias(env) else position_cost(env, s, h, kv, dh)
    scores = b * h * I
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    qkv, grouped = q + 2 * kvb, (2 * q if kv != h else 0)  # k, v repeated to h heads for the kernel
    kept_kv = 2 * q if kv != h else 2 * kvb
    head = b * h * P * dh * by  # the prefix's output
    lse = LSE_BYTES * b * h * n
    Ib = B * (B + lo)  # the block mask's elements
    mask = blocks * (h if bias else 1) * Ib * by if bias else blocks * Ib  # bool without a bias
    pmask = h * P * P * by if bias else 0  # the prefix's [1, H, P, P] mask (a causal call needs none)
    other = 5 * scores + 8 * (Ib + P * P) + (bias.other(h, Ib + P * P) if bias else 0)
    grad = bias is not None and bias.grad
    joined = blocks * q  # the blocks' outputs beside the prefix's, joined by one cat into o_proj's input
    # in training the nf full blocks run as one call with batch dims (b, h nf): q's blocks and the unfolded key
    # windows are copied to that layout when nf >= 2 (one block is a view), and the copies are kept
    copies = sp.Min(1, sp.Max(0, nf - 1)) * b * h * nf * (B + 2 * (B + lo)) * dh * by
    if grad or p.dropout > 0:  # the math kernel (float32 for 16-bit dtypes): the weights are kept
        core = Cost(fwd=4 * scores * dh, bwd=8 * scores * dh, fwd_other=other, bwd_other=2 * other)
        weights = 3 if p.dropout > 0 else 1
        saved = (q + kept_kv + weights * scores * max(by, 4) + q + joined + mask + pmask + copies
                 + (bias.saved(h, Ib + P * P, by) if grad else 0))
        bwd = [q + kept_kv + scores * max(by, 4) - joined]
    else:
        core = Cost(fwd=4 * scores * dh, bwd=10 * scores * dh, fwd_other=other, bwd_other=2 * other)
        saved = q + kept_kv + q + lse + joined + mask + pmask + copies
        bwd = [2 * q + 2 * kept_kv - joined]
    build = bias.peak(h, Ib + P * P, by) if bias else 11 * Ib
    phases = [qkv + grouped + pmask + head + lse,  # the prefix call
              qkv + grouped + head + blocks * (q + mask + build),  # the result allocated, the block mask built
              qkv + blocks * q + (1 - blocks) * head + out]  # at o_proj: the joined blocks, or the one call's output
    if env.pos is not None:
        phases.append(qkv + pos.peak)
    cache = 2 * b * sp.Min(n, cache_keys) * kv * dh * by
    return attention_cost(p, s, h, kv, dh, core, pos, saved + pos.saved, phases, cache, bwd_phases=bwd)
