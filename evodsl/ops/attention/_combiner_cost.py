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
from ._combiner_logsparse_cost import logsparse_cost
from ._common import LSE_BYTES, attention_cost, head_symbols


def combiner_cost(p, env: OpEnv, s: Symbols) -> Cost:
    return {"fixed": _fixed, "axial": _axial, "logsparse": logsparse_cost}[p.mode](p, env, s)


def _axial(p, env: OpEnv, s: Symbols) -> Cost:
    """Combiner-Axial (_combiner_axial.py): m = ceil(n/s) rows gathered to N = m s positions; the rows' own
    attention (SDPA, [b m, h, s, s] scores: the summaries u); then explicit matmuls: row scores [b, m, h, s, s] and
    column scores [b, s, h, m, m] joined into W [b, m, h, s, s + m], softmax, W's two parts against the row's values
    and the column's summaries. bmm copies its non-contiguous operands (q twice, k twice, the values, u, W's column
    part); grouped K/V heads are repeated to h heads first. Not for s = 1 (rows of one token), whose size-1 axes
    spare bmm some copies: its memory is overstated there."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    B = s.sym("s", p.block)
    m = sp.ceiling(n / B)
    N = m * B
    q, out = b * n * h * dh * by, b * n * s.d * by
    qkv = q + 2 * b * n * kv * dh * by
    QN, KVN = b * N * h * dh * by, b * N * kv * dh * by
    rep = 2 * QN if kv != h else 0  # K and V repeated to h heads
    su, sw = b * N * h * B, b * N * h * (B + m)  # the rows' own scores; the joint ones
    W, Wcol = sw * by, b * N * h * m * by
    M1, lse1 = b * N * by, LSE_BYTES * b * N * h
    keep = N * (B + m)  # bool
    core = Cost(fwd=4 * su * dh + 4 * sw * dh, bwd=10 * su * dh + 8 * sw * dh,
                fwd_other=5 * su + 6 * sw, bwd_other=10 * su + 12 * sw)
    # b > 1 (and m > 1): the column matmuls' operands (q, k, u), [b, s, h, m, dh] views, are copied; with b = 1,
    # repeated K/V heads (contiguous [b, m, h, s, dh]) leave k's copy
    many = sp.Min(1, (b - 1) * (m - 1))
    copies = 3 * QN + many * 3 * QN + (0 if kv == h else (1 - many) * QN)  # q, k (row scores), v; q, k, u (columns)
    saved = (8 * N + M1 + QN + 2 * KVN + lse1 + QN  # the gathers' index; the rows' call: mask, q, k, v, lse, u
             + copies + keep + W + Wcol + q)  # the bmm copies, the mask, the weights, W's column part; o_proj's input
    base = qkv + 8 * N + QN + 2 * KVN + QN + rep  # the projections, the gathered q, k, v, u (and K, V repeated)
    phases = [base + 2 * W + keep,  # the joint scores concatenated, then masked
              base + W + 2 * QN + many * QN + Wcol,  # the column part against u (copied)
              QN + q + out]  # at o_proj
    # backward (o_proj's saved input released): o's gradient against W's column part and u; the row part's
    # gradient beside the column part's laid into a full-size W; the two full-size ones summed
    bwd = [3 * QN + Wcol - q, 2 * QN - q + 2 * W - 2 * Wcol, QN - q + 3 * W - Wcol - many * QN]
    cache = b * sp.floor(n / B) * B * (kv + h) * dh * by + b * sp.Mod(n, B) * (h + 2 * kv) * dh * by
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=cache, bwd_phases=bwd)


def _fixed(p, env: OpEnv, s: Symbols) -> Cost:
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
