"""The cost of mha(logsparse) (logsparse.py): each query's W keys gathered, held to measurement in
tests/ops/test_cost_attention.py."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from ._common import AttentionParams, attention_cost, head_symbols


def logsparse_cost(p: AttentionParams, env: OpEnv, s: Symbols) -> Cost:
    """W = w + L keys per query (bidirectional 2W - 1), L = floor(log2(n - w)) + 1 log-spaced ones (0 for n <= w):
    the gathered keys and values [b, h, n, W, dh] (copies; K/V heads repeated to h first, a copy each), the scores
    and weights [b, h, n, W], two matmuls of 2 n W dh per head. Kept: q (its matmul's), the gathered keys and
    values, the weights, the int64 index [n, W], the mask, o_proj's copy of the output; with conv > 1 the
    convolutions' padded input [b, d, n + k - 1]."""
    h, kv, dh = head_symbols(p, s)
    b, n, by, d = s.b, s.n, s.bytes, s.d
    w = s.sym("w", p.window)
    # (the last piece, what `evodsl cost` reads the complexity class from, is log2 n: the same count for n >> w)
    L = sp.Piecewise((0, n <= w), (sp.floor(sp.log(n - w, 2)) + 1, n < 2 ** 40), (sp.floor(sp.log(n, 2)) + 1, True))
    W = w + L if env.causal else 2 * (w + L) - 1
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * d * by
    grouped = 2 * q if kv != h else 0
    KG = b * h * n * W * dh * by  # the gathered keys (or values)
    S = b * h * n * W * by
    idx = 8 * n * W + n * W  # the int64 index and the bool mask
    core = Cost(fwd=4 * b * h * n * W * dh, bwd=8 * b * h * n * W * dh, fwd_other=7 * b * h * n * W,
                bwd_other=14 * b * h * n * W)
    conv_in = 0
    if p.conv > 1:  # q, k by Conv1d over k inputs: k times the FLOPs and parameters of the projections
        k = s.sym("k", p.conv)
        extra = (linear(s, d, h * dh, p.bias) + linear(s, d, kv * dh, p.bias)).scaled(k - 1)
        core = core + Cost(params=extra.params - (h + kv) * dh * (k - 1) * (1 if p.bias else 0),
                           fwd=extra.fwd, bwd=extra.bwd)
        conv_in = b * d * (n + k - 1) * by
    dropped = 2 * S if p.dropout > 0 else 0
    saved = q + 2 * KG + S + idx + q + conv_in + dropped
    # the matmuls: a gathered copy, the scores or the weights, q copied into the batched layout or the output;
    # the int64 positions, their clamped copy and two masks
    phases = [q + 2 * kvb + grouped + KG + S + q + 2 * 8 * n * W + 2 * n * W,
              q + 2 * kvb + 2 * S + 2 * 8 * n * W + 2 * n * W,  # the softmax
              q + 2 * kvb + q + q + out]  # at o_proj
    bwd = [KG + S]  # at a matmul's backward: the gradients of the weights and the gathered keys or values
    cache = 2 * b * n * kv * dh * by + b * (p.conv - 1) * d * by  # every key and value, the conv's last inputs
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=cache,
                          bwd_phases=bwd)
