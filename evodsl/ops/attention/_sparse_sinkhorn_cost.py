"""The cost of mha(sparse_sinkhorn) (sparse_sinkhorn.py, _sparse_sinkhorn_sort.py): the projections, the sorting
network on the m = ceil(n / B) block summaries, Sinkhorn's [m, m] iterations, the K and V blocks mixed by S, and SDPA
of each query block against its 2B keys (the fused kernel: its mask is a bool without gradient)."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from ._common import LSE_BYTES, attention_cost, head_symbols


def sparse_sinkhorn_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """FLOPs: the sorting network's two linear maps on b m summaries; S (b, [m, m]) times the K and V blocks
    ([m, B kv dh]); SDPA over [L, 2B] scores per head (L = m B, the padded length); per Sinkhorn step 5 FLOPs an
    entry of S (causal: 7, the prefix sums). Kept: the summaries and the network's activations; every Sinkhorn
    step's input and logsumexp (causal: the row step's, and the column step's exp, prefix sums and their clamp) and
    S; the padded K and V blocks (the mixing's); SDPA's q, its 2B keys and values a block (the sorted and the own
    blocks concatenated), output and logsumexp; the mask, which SDPA keeps as a float additive mask (present when
    causal or when B does not divide n); o_proj's input, a copy when it is a strided slice (b > 1 and L > n)."""
    h, kv, dh = head_symbols(p, s)
    b, n, by, d = s.b, s.n, s.bytes, s.d
    B = s.sym("B", p.block)
    T = s.sym("T", p.iters)
    NB = s.sym("N_B", -(-p.max_len // p.block))
    m = sp.ceiling(n / B)
    L = m * B  # the padded length
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * d * by
    qL, kL = b * L * h * dh * by, b * L * kv * dh * by
    sort = linear(s, d, d, p.bias, tokens=b * m) + linear(s, d, NB, p.bias, tokens=b * m)
    mix = Cost(fwd=2 * 2 * b * m * m * B * kv * dh, bwd=2 * 2 * 2 * b * m * m * B * kv * dh)
    pairs = b * h * L * 2 * B
    per_entry = 7 if env.causal else 5
    core = Cost(fwd=4 * pairs * dh, bwd=10 * pairs * dh, fwd_other=5 * pairs + 2 * per_entry * T * b * m * m,
                bwd_other=10 * pairs + 4 * per_entry * T * b * m * m)
    Sb, mb = b * m * m * by, b * m * by  # S; one per-row (or per-column) logsumexp
    masked = 1 if env.causal else sp.Min(1, L - n)  # SDPA gets a mask
    mask_bool, mask_float = masked * b * L * 2 * B, masked * b * L * 2 * B * by
    copied = sp.Min(1, (b - 1) * (L - n))  # o_proj's input is a strided slice: a contiguous copy
    net = b * m * (2 * d + NB) * by  # the summaries, the hidden layer, R (relu's outputs)
    if env.causal:  # the count, the [m, m] mask; per iteration the row step's input and logsumexp, exp, cumsum, clamp
        sinkhorn = m * by + m * m + T * (4 * Sb + mb) + Sb
    else:  # per iteration each step's input and logsumexp
        sinkhorn = T * 2 * (Sb + mb) + Sb
    lse = LSE_BYTES * b * h * L
    saved = net + sinkhorn + 2 * kL + 2 * qL + 4 * kL + lse + mask_float + copied * q
    phases = [q + qL + 2 * kvb,  # q padded
              qL + 2 * kvb + 2 * kL,  # K and V padded
              qL + 2 * kL + b * L * d * by + 3 * b * m * d * by,  # x padded, three [b, m, d] of the sorting network
              qL + 7 * kL + mask_bool + Sb,  # the values' blocks mixed beside the keys'
              2 * qL + 6 * kL + lse + Sb + mask_bool + mask_float,  # SDPA: its output, logsumexp, float mask
              qL + copied * q + out]  # at o_proj
    # backward, at SDPA's: o's gradient padded to L, those of q, the keys and the values, o_proj's copy released
    bwd = [2 * qL + 4 * kL - copied * q]
    # the projections: the input's three gradients with k's and v's alive (their projections run last), all released
    return attention_cost(p, s, h, kv, dh, sort + mix + core, Cost(), saved, phases, cache=b * n * d * by,
                          bwd_phases=bwd, projections_bwd=3 * out + 2 * kvb - saved)
