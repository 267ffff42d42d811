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
    R = b * h * mc * C ** 2 * by
    state = b * h * dh * M * by
    chunked, schunked = t + padded * (T - t), u + padded * (U - u)
    # kept (an estimate from the graph): the projections' swish inputs and outputs (q, k, v), the gate's logsigmoid
    # input and output and the slot writes; per pass the chunked queries, keys, values and log decays, B's exp
    # (and exp(-B), exp(B_C - B)), the scores [C, C] and the states before every chunk; the softmax's output; the
    # output side: swish's input and output, the rms, o_proj's input
    saved = (6 * t + 3 * u + 2 * (3 * chunked + 3 * schunked + 3 * U + R + mc * state)
             + u + 4 * t + b * n * by)
    peak = 3 * t + 3 * u + 3 * chunked + 3 * schunked + 3 * U + R + (mc + 1) * state
    bwd_peak = sp.Max(2 * t, 2 * u)
    return replace(total + core, saved=saved, peak=peak, cache=2 * state, bwd_peak=bwd_peak, saves_input=True)
