"""The cost of mha(nap) (nap.py): the projections, the explicit [b, h, n, n] scores q k^T / sqrt(dh), each row's
mean and variance (causal: over its past keys, the masks' bool [n, n] kept), the weights g (s - mu) / std + b, and
w V. O(n^2 dh) time, O(n^2) bytes: the centred scores and the weights are kept for backward."""
from __future__ import annotations

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import attention_cost, head_symbols


def nap_cost(p, env: OpEnv, s: Symbols) -> Cost:
    h, kv, dh = head_symbols(p, s)
    b, n, d, by = s.b, s.n, s.d, s.bytes
    e = b * h * n * n
    S, row = e * by, b * h * n * by  # one [b, h, n, n] tensor; one [b, h, n, 1]
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * d * by
    # the scale, the centring, the square, the two sums, rsqrt's product, the shift (causal: two masks)
    core = Cost(params=2 * h, fwd=4 * e * dh, bwd=8 * e * dh, fwd_other=(8 + (2 if env.causal else 0)) * e,
                bwd_other=(16 + (4 if env.causal else 0)) * e)
    # the centred scores and the weights; Q and K as q k^T reads them, V as w V does, o_proj's input (copies);
    # rsqrt's output and the row factor; causal: the mask and its two complements, the keys' counts
    saved = 2 * S + 4 * q + 2 * row + ((3 * n * n + n * by) if env.causal else 0)
    base = q + 2 * kvb  # the projections
    centre = 3 * S + row  # the centred scores, their product with the factor, the weights
    if env.causal:
        centre += h * n * n * by + n * n + n * by  # the shift on the past ([h, n, n]), the mask, the counts
    phases = [base + 2 * q + 2 * S, base + centre, base + S + 2 * q, base + 2 * q + out]
    bwd = (2 * S + row if env.causal else 3 * S - 2 * row) - 2 * q + kvb  # the weights' and scores' gradients
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=2 * b * n * kv * dh * by,
                          bwd_phases=[bwd])
