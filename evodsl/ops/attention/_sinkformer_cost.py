"""The cost of mha(sinkformer) (sinkformer.py): the projections, the [b, h, n, n] scores by an explicit matmul, T
log-space normalisations (a logsumexp and a subtraction each), their exp, and the weights times V."""
from __future__ import annotations

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import attention_cost, head_symbols


def sinkformer_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """FLOPs: Q K^T and W V (4 per pair and channel forward, 8 backward). Per normalisation, 5 per score (the
    logsumexp's max, exp of the difference, sum and log, then the subtraction), the final exp 1. Kept: the scaled
    q and k (the scores' matmul: with K/V groups, k repeated to h heads), every normalisation's input and its
    logsumexp, the weights (the exp's output, the second matmul's input) and v (repeated likewise), o_proj's
    input (a copy, [b, n, h dh])."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    T = s.sym("T", p.iters)
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    pairs = b * h * n * n
    S, lse = pairs * by, b * h * n * by  # one [b, h, n, n] tensor; one logsumexp
    grouped = kv != h
    kh = q if grouped else kvb  # k (and v) as the matmuls see them: repeated to h heads with K/V groups
    live = q + 2 * kh  # q, k, v (with K/V groups the repeated k, v; the projections' outputs released)
    core = Cost(fwd=4 * pairs * dh, bwd=8 * pairs * dh, fwd_other=(5 * T + 1) * pairs + b * h * n * dh,
                bwd_other=2 * (5 * T + 1) * pairs + 2 * b * h * n * dh)
    saved = q + 2 * kh + T * (S + lse) + S + q
    phases = [live + q + S,  # the scores: the scaled q beside them
              live + 3 * S + lse,  # a logsumexp: its input, the input less the maxima, their exp; the maxima
              live + S + 2 * q + out]  # at o_proj: the weights, o and its copy
    # backward, at a normalisation's: the incoming gradient, exp(input - logsumexp) and their product, with
    # o_proj's input (the copy of o) released
    bwd = [3 * S + lse - q]
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=0, bwd_phases=bwd)
