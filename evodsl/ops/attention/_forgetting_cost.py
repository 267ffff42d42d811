"""The cost of mha(forgetting) (forgetting.py): the projections and the forget gates' [d -> h] projection, then
one fused SDPA call over the extended q', k', v' [b, h, n, dh + 1] (k', v' expanded to the query heads)."""
from __future__ import annotations

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from ._common import LSE_BYTES, attention_cost, head_symbols


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
    # the projections' phase: the input's gradients of the gate and v summed beside q's, k's and log f's
    return attention_cost(p, s, h, kv, dh, gates + core, Cost(), saved, phases, cache=2 * b * n * kv * dh * by + gate,
                          bwd_phases=bwd, projections_bwd=q + 3 * out - saved + kvb + gate)
