"""The cost of a band in the form that runs (_banded.banded_attention):

- the band covers the sequence: one SDPA call (causal, or over every key), in training and at inference;
- bidirectional otherwise: _blocked_band (banded_attention_cost's own formulas);
- causal otherwise: training runs _blocked_band (all blocks in one call; its cost is `blocked`, from
  banded_attention_cost), and inference _causal_band: a causal SDPA prefix of P = lo + 1 queries, then blocks of
  B queries (band_block) against B + lo keys, written one by one into one result. The inference peak and
  fwd_inference below are that form's (P^2 + (n - P - r)(B + lo) + r (r + lo) scores per sequence and head, r the
  last block's queries: at most causal SDPA's n^2); fwd is the training form's."""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import (LSE_BYTES, AttentionParams, attention_cost, head_symbols, position_cost, projections_cost,
                      rotates, score_bias)


def one_call_cost(p: AttentionParams, env: OpEnv, s: Symbols, bias, cache, causal: bool) -> Cost:
    """_banded._one_call over the whole sequence: n x n scores, causal or not, the bias (if any) as a
    [1, H, n, n] mask. `bias`: the variant's BandBias with the position scheme's already added."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    pos = Cost() if score_bias(env) else position_cost(env, s, h, kv, dh)
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    qkv = q + 2 * kvb
    grouped = 2 * q if kv != h else 0  # k, v repeated to h heads before the kernel
    kept_kv = 2 * q if kv != h else 2 * kvb
    grad = bias is not None and bias.grad
    scores, nn, lse = b * h * n ** 2, n ** 2, LSE_BYTES * b * h * n
    copy = q if rotates(env) else 0  # o_proj's input: a copy unless the fused kernel's output is laid out
    # [b, n, h, dh] (as q is, unrotated); the math kernel's always is
    mask = h * nn * by if bias else 0
    other = 5 * scores + (8 * nn + bias.other(h, nn) if bias else 0)
    if grad or p.dropout > 0:  # the math kernel (float32 for 16-bit dtypes): the weights are kept
        core = Cost(fwd=4 * scores * dh, bwd=8 * scores * dh, fwd_other=other, bwd_other=2 * other)
        weights = 3 if p.dropout > 0 else 1
        saved = ((3 * b * n * h * dh + weights * scores) * max(by, 4) + q  # o_proj's copy
                 + (bias.saved(h, nn, by) + (nn if causal else 0) if grad else 0))  # the causal where's condition
        bwd = [q + scores * max(by, 4)] if p.dropout > 0 else [2 * scores * max(by, 4) - q]
    else:
        core = Cost(fwd=4 * scores * dh, bwd=10 * scores * dh, fwd_other=other, bwd_other=2 * other)
        saved = q + kept_kv + q + lse + copy + mask  # q, k, v, o, its logsumexp
        bwd = [2 * q + kept_kv - copy]  # o's gradient and those of q, k, v; o_proj's copy released
    phases = [qkv + grouped + mask + q + lse, qkv + q + copy + out]  # the call (inference: the fused kernel); o_proj
    if bias:  # built: a bias whose peak counts its masked copy (bias.masked_copy) needs none over every key
        phases.append(qkv + grouped + bias.peak(h, nn, by) - (h * nn * by if bias.masked_copy and not causal else 0))
    if env.pos is not None:
        phases.append(qkv + pos.peak)
    return attention_cost(p, s, h, kv, dh, core, pos, saved + pos.saved, phases, cache, bwd_phases=bwd)


def with_one_call(blocked: Cost, single: Cost, n, lo, hi, peak=None, fwd_inference=None) -> Cost:
    """`single` where the band covers the sequence (n <= lo + 1, and n <= hi + 1 unless causal), else
    `blocked` (its peak and its forward FLOPs without autograd replaced by `peak`, `fwd_inference` if given)."""
    covers = (n <= lo + 1) if hi == 0 else sp.And(n <= lo + 1, n <= hi + 1)

    def form(one, other):
        return sp.Piecewise((one, covers), (other, True))

    fields = ("fwd", "fwd_other", "bwd", "bwd_other", "saved", "bwd_peak")
    return replace(blocked, **{f: form(getattr(single, f), getattr(blocked, f)) for f in fields},
                   peak=form(single.peak, blocked.peak if peak is None else peak),
                   fwd_inference=form(single.fwd, blocked.inference_fwd if fwd_inference is None else fwd_inference))


def causal_band_cost(p: AttentionParams, env: OpEnv, s: Symbols, lo, bias, cache, blocked: Cost) -> Cost:
    from ._banded import POSITION_BIAS, band_block

    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    if score_bias(env):  # the position scheme's bias on the band, alone or added to the variant's own
        bias = POSITION_BIAS if bias is None else bias.plus_position()
    pos = Cost() if score_bias(env) else position_cost(env, s, h, kv, dh)
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    qkv = q + 2 * kvb
    grouped = 2 * q if kv != h else 0
    single = one_call_cost(p, env, s, bias, cache, causal=True)

    # Inference, n > lo + 1: the prefix call, then the blocks into one result laid out [b, n, h, dh]
    B = band_block(int(sp.sympify(lo).subs(s.values)), 0)
    P, Ib = lo + 1, B * (B + lo)  # the prefix's queries; the elements of the block mask
    head = b * h * P * dh * by
    pmask = h * P ** 2 * by if bias else 0
    bmask = h * Ib * by if bias else Ib * by  # additive, per head with a bias, else one for all heads
    phases = [qkv + grouped + pmask + head,  # the prefix call
              qkv + grouped + head + (bias.peak(h, Ib, by) if bias else 11 * Ib),  # the block mask built
              qkv + grouped + head + bmask + q,  # the result allocated, the prefix's output copied in
              qkv + grouped + q + bmask + b * h * B * dh * by,  # a block's call
              qkv + q + out]  # at o_proj
    if bias:
        phases.append(qkv + grouped + bias.peak(h, P ** 2, by))  # the prefix's mask built
    if env.pos is not None:
        phases.append(qkv + pos.peak)
    # the prefix's P x P scores (SDPA counts the masked half too), then the blocks: B queries against B + lo
    # keys each, the last r = (n - P) mod B queries against r + lo
    r = sp.Mod(n - P, B)
    scores = b * h * (P ** 2 + (n - P - r) * (B + lo) + r * (r + lo))
    fwd = projections_cost(p, s, h, kv, dh).fwd + pos.fwd + 4 * scores * dh
    return with_one_call(blocked, single, n, lo, 0, peak=sp.Max(*phases) - out, fwd_inference=fwd)
