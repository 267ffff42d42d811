"""The cost of mha(forgetting) (forgetting.py): the projections and the forget gates' [d -> h] projection, then
one fused SDPA call over the extended q', k', v' [b, h, n, dh + 1] (k', v' expanded to the query heads); the Pro
block's parts (pro_cost)."""
from __future__ import annotations

from dataclasses import replace

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from ._common import LSE_BYTES, attention_cost, head_symbols
from ._forgetting_pro import flags


def forgetting_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """SDPA counts 4 B K (dh + 1) forward over the B x K = n x n scores (causal not halved) and 2.5x backward
    (it recomputes the weights); the gates: logsigmoid and cumsum, 1 FLOP an element each, and the column."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    scores = b * h * n ** 2
    w = dh + (1 if s.bytes >= 4 else 2)  # the extra columns: -D, or for 16-bit inputs its two parts
    ext = b * n * h * w * by  # one of q', k', v', o'
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    gate = b * n * h * max(by, 4)  # the gates' logits (logsigmoid keeps them), log f, D: float32 at least (the
    # 16-bit forms' casts are not in the harness, which measures float32)
    lse = LSE_BYTES * b * h * n
    gates = linear(s, s.d, h, True)
    core = Cost(fwd=4 * scores * w, bwd=10 * scores * w, fwd_other=5 * scores + 4 * b * n * h,
                bwd_other=10 * scores + 8 * b * n * h)
    rep = b * n * h * dh * by if kv != h else 0  # v repeated to the query heads (k's is released by then)
    saved = 4 * ext + lse + 2 * gate + q  # SDPA's q', k', v', o' and logsumexp; logsigmoid's input and buffer;
    # o_proj's copy of the output
    phases = [q + 2 * kvb + 3 * gate + rep + 3 * ext,  # q', k', v' built (q, k, v, log f, D and -D alive)
              4 * ext + lse,  # SDPA
              ext + q + out]  # at o_proj: o', its copy, the output
    bwd = [4 * ext - q]  # the gradients of o', q', k', v'; o_proj's copy released
    extra, kept, on = pro_cost(p, s, h, kv, dh), 0, flags(p)
    if any(on.values()):
        kept = extra.saved
        phases[0] = phases[0] + extra.peak
        if on["output_norm"] and on["output_gate"]:  # measured: their saved tensors released before SDPA's
            bwd = [2 * q, out + q - b * n * h * by]  # backward; the gate's input gradient beside the norm's
        elif on["output_norm"]:
            bwd = [4 * q - ext]
        elif on["output_gate"]:  # measured: the gate's backward, its input gradient beside dsigma and dlogit
            bwd = bwd + [out + 2 * q + 4 * gate]
    # the projections' phase: the input's gradients of the gate and v summed beside q's, k's and log f's; measured
    # with the Pro parts (h dh != d, where this phase is the peak): the shift's tensors still alive there
    proj = q + 3 * out - saved - kept + kvb + gate
    if on["kv_shift"]:
        proj = proj + 2 * kvb + b * n * kv * by
    cache = 2 * b * n * kv * dh * by + gate + (2 * b * kv * dh * by if on["kv_shift"] else 0)  # + the shift state
    return attention_cost(p, s, h, kv, dh, gates + core + replace(extra, saved=0, peak=0), Cost(), saved + kept,
                          phases, cache=cache, bwd_phases=bwd, projections_bwd=proj)


def pro_cost(p, s: Symbols, h, kv, dh) -> Cost:
    """The Pro block's parts (_forgetting_pro.py): params, FLOPs; `saved` the bytes they keep for backward, `peak`
    what they add to the projections' phase. Elementwise: a sigmoid 1 FLOP, RMSNorm 4 and its gain 1 an element."""
    on, b, n, by = flags(p), s.b, s.n, s.bytes
    Q, K = b * n * h * dh, b * n * kv * dh  # elements of q (and o), of k (and v)
    total = Cost()
    if on["kv_shift"]:  # two [d -> kv] gates; a_t (t_{t-1} - t_t) + t_t: a and the difference kept, each of k, v
        total = total + linear(s, s.d, kv, False).scaled(2) + Cost(
            fwd_other=2 * (b * n * kv + 3 * K), bwd_other=4 * (b * n * kv + 3 * K),
            saved=2 * (K + b * n * kv) * by, peak=2 * K * by)
    if on["qk_norm"]:  # each keeps its input and 1/rms, and the normalised tensor for the gain
        total = total + Cost(params=(h + kv) * dh, fwd_other=5 * (Q + K), bwd_other=10 * (Q + K), saved=(2 * Q + 2 * K + b * n * (h + kv)) * by)
    if on["output_norm"]:  # the input is SDPA's output, kept already: 1/rms and the normalised tensor
        total = total + Cost(params=h * dh, fwd_other=5 * Q, bwd_other=10 * Q, saved=(Q + b * n * h) * by)
    if on["output_gate"]:  # W_g [d -> h dh]; sigmoid(W_g x) kept, and the normed output it multiplies (if normed)
        total = total + linear(s, s.d, h * dh, False) + Cost(fwd_other=2 * Q, bwd_other=4 * Q,
                                                              saved=(2 * Q if on["output_norm"] else Q) * by)
    return total
