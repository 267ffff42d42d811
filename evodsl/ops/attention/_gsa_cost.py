"""The cost of mha(gsa) (gsa.py): its projections and gate, then two chunked GLA passes over m slots a head (the
first _gsa_kernel.py's chunked_slot_decay, keys dk wide and the m slots its values; the second chunked_decay, the m
slots its keys and dv its values). Symbols as _recurrent_cost.py's: C, m_c = ceil(n / C) chunks, N = m_c C rows."""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from ._common import head_symbols, projections_cost
from ._recurrent_cost import chunk_symbols, decay_kernel_flops


def gsa_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """Both passes have the FLOPs of chunked_decay (the first with its decay on the value side: the same matmuls,
    q k^T and its product with the decayed values, the chunk's state and the queries against the state before)."""
    h, kv, dh = head_symbols(p, s)
    M = s.sym("m", p.slots)
    b, by, n = s.b, s.bytes, s.n
    C, mc, N, several, padded = chunk_symbols(p, s)
    f1, b1 = decay_kernel_flops(b, h, N, C, dh, M, several)
    f2, b2 = decay_kernel_flops(b, h, N, C, M, dh, several)
    total = projections_cost(p, s, h, kv, dh) + linear(s, s.d, kv * M, False)
    core = Cost(params=h * dh, fwd=f1 + f2, bwd=b1 + b2)  # the norm's scale
    t, T = b * h * n * dh * by, b * h * N * dh * by  # a head tensor, its chunked copy
    u, U = b * h * n * M * by, b * h * N * M * by  # a slot tensor, its chunked copy
    tk, uk = b * kv * n * dh * by, b * kv * n * M * by  # the same for the K/V heads
    R, state, carry = b * h * mc * C ** 2 * by, b * h * dh * M * by, b * h * mc * M * by
    chunked, schunked, unpadded = t + padded * (T - t), u + padded * (U - u), 1 - padded
    grouped = 0 if p.kv_heads in (None, p.heads) else 1
    # the layer: logsigmoid's input and buffer, expm1's result; swish's inputs (q, k, v)
    layer = 3 * uk + 2 * tk + t
    # pass 1 (chunked_slot_decay): q and k for q k^T (padded: their chunked copies; unpadded, the matmuls copy q's
    # token-major layout, twice, and k's, twice unless the grouped heads' repeat is already head-major), the
    # mask, the slot writes (chunked), exp(B_C - B) and its product, exp(B), exp(-B), the values so decayed, the
    # sum the decay multiplies, the scores, the carries, the states (each before its chunk, and stacked)
    first = (2 * padded * T + unpadded * (3 - grouped) * t + C ** 2 + schunked + 6 * U + R + carry + 2 * mc * state)
    # pass 2 (chunked_decay): the softmax's output, the chunked copies of it and of the slot writes (padded), exp(B),
    # exp(-B), the decayed queries and keys, exp(B_C - B) and the keys so decayed, the mask, the carries, the
    # chunked values, the scores, the states (each, and stacked)
    second = u + 2 * padded * U + 6 * U + C ** 2 + carry + chunked + R + 2 * mc * state
    # the output side: swish's input (the chunked output), the token-major copy, the rms, the normed and scaled heads
    finish = T + 3 * t + b * n * by
    # one chunk: the chunk's own states (into the state after, which nothing reads) keep nothing: pass 1's
    # decayed slot writes, k's transposed copy (unpadded, ungrouped) and the zero state, pass 2's decayed keys and its
    # zero state
    single = (1 - several) * (2 * U + 2 * state + unpadded * (1 - grouped) * t)
    saved = layer + first + second + finish - single
    out = b * n * s.d * by
    # the inference peak, at pass 2's last sum: q, k, v, the slot writes and log decays, pass 1's output and its
    # softmax, the chunked copies (padded), B, the decayed queries and keys, the scores, the decayed keys, the
    # states (each, the last, the chunks' own, stacked), the two products and their sum
    peak = (3 * t + 2 * u + U + u + padded * (3 * U + T) + 3 * U + R + U + (3 * mc + 1) * state + 3 * T + C ** 2
            + carry)
    # the backward's peak: the output side, the normed heads' gradients beside the input's (the rms released); or
    # pass 2's backward at qd @ states (chunked_decay: o = qd @ states + a @ v), once the output side has released
    # the token-major copy, the normed and scaled heads and the rms, and a @ v its a and o: the gradients of o (in
    # chunks), of the chunked values, of a, of the stacked states (several chunks; one chunk's state before is zero)
    # and of the decayed queries (m slots wide), which lead where the slots outnumber a head's width
    # Then its backward at the decayed queries and keys (a = qd kd^T masked), once the stacked states, the chunked
    # values and the chunks' saved states are released too: three gradients m slots wide (of qd from the states and
    # from the scores, of kd; several chunks: qd's summed, then q's and exp(B)'s from qd = q exp(B), the chunk keys'
    # decayed copy kc released, the states before each chunk but the last's and the carries' exp)
    output_side = 3 * t - b * n * by
    at_states = T + U + several * mc * state - 3 * t - b * n * by
    at_scores = (3 * U - (1 + several * (2 * mc - 2)) * state - chunked - 3 * t - b * n * by
                 - (1 - several) * C ** 2)
    bwd_peak = sp.Max(output_side, at_states, at_scores)
    return replace(total + core, saved=saved, peak=peak - out, cache=2 * state, bwd_peak=bwd_peak, saves_input=True)
