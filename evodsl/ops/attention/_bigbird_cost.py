"""The cost of mha(bigbird) in the form that runs (bigbird.py): for nb = ceil(n / B) <= g blocks, full attention
(one SDPA call, softmax's cost); for more,

- the R = nb - g local query blocks: one SDPA call of [b, h R, B, dh] queries against their S = w + g + r key
  blocks, [b, h R, S B, dh] keys and values gathered by index_select (from a contiguous [b, kv, N, dh] copy
  of K and V, or the padded ones), with a [1, h R, 1, S B] additive mask;
- the g B global queries (a concatenation) against all N = nb B keys, one SDPA call;
- their outputs concatenated to [b, h, N, dh], then o_proj's input (a transposed copy).
"""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..cost import Cost, Symbols, piecewise
from ..registry import OpEnv
from ._common import LSE_BYTES, AttentionParams, attention_cost, head_symbols
from .softmax import softmax_attention_cost


def bigbird_cost(p: AttentionParams, env: OpEnv, s: Symbols) -> Cost:
    full = replace(softmax_attention_cost(p, env, s), cache=0)  # nb <= g: every block global
    return piecewise([(full, sp.ceiling(s.n / s.sym("B", p.block)) <= p.globals), (_sparse_cost(p, env, s), True)])


def _sparse_cost(p: AttentionParams, env: OpEnv, s: Symbols) -> Cost:
    """Forward FLOPs: the projections and the two SDPA calls' 4 scores dh. Memory: what the torch code
    allocates, for an unmasked call (the phases below)."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    B = s.sym("B", p.block)
    g = p.globals
    S = s.sym("w", p.window) + g + s.sym("r", p.random)
    nb = sp.ceiling(n / B)
    N, R = nb * B, nb - g
    padded = sp.Min(1, N - n)  # 1 where the last block is padded
    local, glob = b * h * R * B * S * B, b * h * g * B * N  # score elements
    Q, out = b * n * h * dh * by, b * n * s.d * by
    Qn, KVn = b * h * N * dh * by, b * kv * N * dh * by  # padded to N (= Q, KV when N = n)
    KB = b * h * R * S * B * dh * by  # the gathered keys (and values)
    Ql, Gq = b * h * R * B * dh * by, b * h * g * B * dh * by  # local and global queries (and outputs)
    M = h * R * S * B * by  # the additive mask
    idx = 8 * h * R * S  # the gather's index
    lse_l, lse_g = LSE_BYTES * b * h * R * B, LSE_BYTES * b * h * g * B
    core = Cost(fwd=4 * (local + glob) * dh, bwd=10 * (local + glob) * dh, fwd_other=5 * (local + glob),
                bwd_other=10 * (local + glob))
    live = Qn + 2 * KVn  # q, k, v (padded) until the forward returns
    # K and V are copied to [b, kv, N, dh] for the gather (already contiguous where padded)
    kv_copy = (1 - padded) * KVn
    saved = 2 * KB + M + 2 * Ql + lse_l + idx + Q + (Gq + Gq + lse_g if g else 0)
    if g:
        saved = saved + 2 * KVn * (1 - padded) + 2 * KVn * padded  # the global call keeps K and V
    phases = [live + KB + kv_copy + KB,  # the second gather
              live + Gq * (1 if g else 0) + 2 * KB + M + 2 * Ql + lse_l + idx,  # the local SDPA call
              live + (Gq + Ql + Qn if g else 0),  # the concatenation
              live + (Qn if g else 0) + Q + out]  # o_proj's input and output
    # backward: the global call's first (its saved tensors then released), then the local call's gradients of
    # q, k and v beside a contiguous copy of its output's gradient (a slice of the concatenation's, with g > 0)
    bwd = [Ql + 2 * KB + (Ql - 2 * Gq - lse_g if g else 0)]
    if p.dropout > 0:  # SDPA's math kernel (the fused one has no dropout): it keeps the weights, the dropout
        # mask and the dropped weights (float32) in place of the outputs, their logsumexp and the additive mask
        core = replace(core, bwd=core.bwd - 2 * (local + glob) * dh)
        saved = saved + 3 * (local + glob) * max(by, 4) - (Ql + lse_l + M) - (Gq + lse_g if g else 0)
        Ls, Gs = local * max(by, 4), glob * max(by, 4)
        # backward: the global call's first (the weights' gradient, v's at h heads, o's slice), then the local
        # call's (the weights' and the gathered values' gradients) once the global call's weights, mask, dropped
        # weights and scaled q are released and its K/V gradients summed to kv heads
        bwd = [Ls + KB - (3 * Gs + 2 * Gq + Qn - 2 * KVn if g else 0)] + ([Gs + Gq + Qn] if g else [])
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, 0, bwd_phases=bwd)
