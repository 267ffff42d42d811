"""The cost of mha(differential) (differential.py): the projections of 2h half-heads, four SDPA calls (each map
over V's two halves), the difference, RMSNorm per head and the scale."""
from __future__ import annotations

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import LSE_BYTES, attention_cost, position_cost, score_bias


def differential_cost(p, env: OpEnv, s: Symbols) -> Cost:
    b, n, by = s.b, s.n, s.bytes
    h = s.sym("h", p.heads)
    kv = h if p.kv_heads in (None, p.heads) else s.sym("kv", p.kv_heads)
    dh = s.d / (2 * h) if p.head_dim is None else s.sym("dh", p.head_dim)
    alibi = score_bias(env)  # one slope per diff head: h heads; rope turns 2h half-heads
    pos = position_cost(env, s, h, kv, dh) if alibi else position_cost(env, s, 2 * h, 2 * kv, dh)
    bias = h * n ** 2 * by if alibi else 0  # ALiBi's [1, h, n, n] bias: the mask of all four calls, kept
    scores, half = b * h * n ** 2, b * h * n * dh  # one map's scores; one map's output over one half of V
    q, kvb, out = 2 * half * by, b * n * 2 * kv * dh * by, b * n * s.d * by
    qkv = q + 2 * kvb
    lse = LSE_BYTES * b * h * n
    core = Cost(params=6 * dh,  # lambda's four vectors, the norm's weight
                fwd=4 * 4 * scores * dh, bwd=4 * 10 * scores * dh,
                fwd_other=4 * 5 * scores + 4 * half + 5 * 2 * half, bwd_other=2 * (4 * 5 * scores + 14 * half))
    saved = qkv + 4 * half * by + 4 * lse + 3 * q + b * h * n * by + 3 * by + bias + pos.saved  # q, k, v; SDPA's four
    # outputs and logsumexps; the difference (the norm's input), its normalised form, o_proj's copy; rstd; lambda
    rstd = b * h * n * by  # RMSNorm's reciprocal root mean square per head and position
    phases = [qkv + 3 * q + rstd + bias,  # at the norm: the difference of the maps, its normalised and weighted forms
              qkv + 2 * q + out + bias]  # at o_proj: the scaled heads and their [b, n, 2 h dh] copy
    if env.pos is not None:
        phases.append(qkv + pos.peak)  # while the position scheme is applied
    if alibi and env.causal:  # the causal mask filled into a copy of the bias: both, and the bool [n, n] mask
        phases.append(qkv + 2 * bias + n ** 2)
    # backward: the gradients of o_proj's input, of the norm's output and of the maps' difference, the norm's
    # rstd released
    bwd = [3 * q - rstd]
    return attention_cost(p, s, 2 * h, 2 * kv, dh, core, pos, saved, phases, cache=2 * kvb, bwd_phases=bwd)
