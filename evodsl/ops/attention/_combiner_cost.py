"""The cost of mha(combiner) (combiner.py), the form torch runs at a known n (the export's at least two blocks are
not costed): S = ceil(n/s) blocks of s positions, N = S s gathered positions (the last block's tail repeats the last
token), then

- the summaries: the max pools of the block's queries (over the group's query heads too) and keys, and one SDPA
  call per block and K/V head of its pooled query against its s keys ([b S, kv, 1, s] scores);
- each block's row's summary keys and values gathered ([b S, S, kv, dh]) and concatenated after the block's own
  keys and values ([b S, kv, s + S, dh]): one SDPA call of [b S, h, s, dh] queries against s + S keys, a [b S, 1, s, s + S] bool mask
  (which the kernel turns into an additive one of the input's dtype; the summaries' mask likewise);
- the output, laid out by the kernel as the queries ([b, N, h dh]), read by o_proj through a slice of its n rows
  (a copy where it is not contiguous: N > n with b > 1)."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import LSE_BYTES, attention_cost, head_symbols


def combiner_cost(p, env: OpEnv, s: Symbols) -> Cost:
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    B = s.sym("s", p.block)
    S = sp.ceiling(n / B)
    N = S * B
    q, out = b * n * h * dh * by, b * n * s.d * by
    qkv = q + 2 * b * n * kv * dh * by
    QN, KVN = b * N * h * dh * by, b * N * kv * dh * by  # the gathered q, k, v
    summ = b * S * kv * dh * by  # a pooled query or key, a summary value
    expd = b * S * kv * S * dh * by  # the summary keys (values) gathered for every block
    KC = KVN + expd  # the concatenated keys (values): each block's own, then the summaries
    scores1, scores2 = b * S * kv * B, b * N * h * (B + S)
    M1, M2 = b * N * by, b * N * (B + S) * by  # the additive masks SDPA makes of the bool ones
    lse1, lse2 = LSE_BYTES * b * S * kv, LSE_BYTES * b * N * h
    idx, row = 8 * N, 8 * b * S * S  # the gathers' indices (int64): the positions, the summaries of each block
    copied = sp.Min(1, (b - 1) * (N - n))  # o_proj reads a strided slice: a copy of its input
    core = Cost(fwd=4 * (scores1 + scores2) * dh, bwd=10 * (scores1 + scores2) * dh,
                fwd_other=5 * (scores1 + scores2) + QN + 2 * KVN, bwd_other=10 * (scores1 + scores2) + 2 * (QN + 2 * KVN))
    saved = (idx + row + QN + 2 * KVN + 3 * summ + M1 + lse1  # the indices; q, k, v; the pools, the summaries
             + M2 + 2 * KC + lse2 + QN + copied * q)  # the joint call: its mask, keys, values, output, lse
    live = qkv + QN + 2 * KVN + 2 * idx + 2 * summ + row + b * N  # and the summaries' bool mask
    phases = [live + 2 * KC + expd,  # the values' concatenation, their summaries gathered
              live + 2 * KC + b * N * (B + S) + M2 + QN + lse2,  # the joint SDPA call (its bool mask, the additive)
              QN + copied * q + out]  # at o_proj
    # o_proj's input gradient (at N rows; its saved copy released), the joint call's gradients of q, K, V
    bwd = [2 * QN + 2 * KC - copied * q]
    # decoding: the finished blocks' summary keys and values, the raw q, k, v of the unfinished block's tokens
    cache = 2 * b * sp.floor(n / B) * kv * dh * by + b * sp.Mod(n, B) * (h + 2 * kv) * dh * by
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=cache, bwd_phases=bwd)
