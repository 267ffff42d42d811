"""The cost of mha(etc) in the form that runs (etc.py), N the op's input length (G globals and the long input):

- N <= G: every position global, one SDPA call over [b, h, N, N] (softmax's cost; global_out in o_proj's place);
- else _dilated_band.dilated_band with d = 1 and g = G (the band layout of longformer's, _longformer_cost): nb
  blocks of B queries against G + K keys, [b, h, nb, B, G + K] scores in one SDPA call, k and v repeated to h
  heads for grouped K/V heads, o_proj on all N rows; then the G global queries (a slice of q) against all N keys,
  one SDPA call (hard g2l: a [G, N] bool mask), global_out on their G rows, written over o_proj's output.
The export's padded form (_exported) is not costed.
"""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..cost import Cost, Symbols, linear, piecewise
from ..registry import OpEnv
from ._banded import band_layout
from ._common import LSE_BYTES, AttentionParams, attention_cost, head_symbols
from .softmax import softmax_attention_cost


def etc_cost(p: AttentionParams, env: OpEnv, s: Symbols) -> Cost:
    h, kv, dh = head_symbols(p, s)
    out_params = linear(s, h * dh, s.d, p.bias).params  # global_out
    full = softmax_attention_cost(p, env, s)
    full = replace(full, params=full.params + out_params, cache=0)
    return piecewise([(_sparse_cost(p, env, s), s.n > p.globals), (full, True)])


def _sparse_cost(p: AttentionParams, env: OpEnv, s: Symbols) -> Cost:
    """Forward FLOPs: the projections, the band's and the global rows' 4 scores dh (SDPA), global_out on G rows.
    Memory: what the torch code allocates (the phases below), for an unmasked call."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    r, G = s.sym("r", p.radius), s.sym("G", p.globals)
    B, nb, K, L = band_layout(n, r, r)
    W = G + K  # keys per block
    Ik, I = nb * B * K, nb * B * W  # window and block mask elements (one for all b, h)
    scores = b * h * I
    Q, KV, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    KVe = Q if kv != h else KV  # k, v repeated to h heads
    Qp = b * h * nb * B * dh * by  # the blocked queries, padded to nb B positions
    KB = 2 * b * h * nb * W * dh * by  # the blocks' keys and values (the concatenations with the global keys)
    padded_q = sp.Min(1, nb * B - n)
    q_copy = sp.Min(1, (1 - padded_q) * (b - 1))  # SDPA's batch b h is a view of q only for b = 1 (unpadded)
    o_copy = sp.Min(1, padded_q + q_copy)
    padded_kv = 2 * b * h * L * dh * by * sp.Min(1, sp.Min(1, nb - 1) + (L - n))
    lse = LSE_BYTES * b * h * nb * B
    gq, gs = b * G * h * dh * by, b * h * G * n  # the global rows' output; their scores
    lse_g = LSE_BYTES * b * h * G
    keep = G * n if p.segment is not None else 0  # hard g2l's bool mask (and its int64 build)

    glob = linear(s, h * dh, s.d, p.bias, tokens=b * G)  # global_out
    core = Cost(params=glob.params, fwd=4 * (scores + gs) * dh + glob.fwd, bwd=10 * (scores + gs) * dh + glob.bwd,
                fwd_other=5 * (scores + gs) + 10 * Ik, bwd_other=10 * (scores + gs) + 20 * Ik + glob.bwd_other)
    # the band's SDPA keeps its q (a copy, or q_proj's output itself), keys, values, output, logsumexp and mask;
    # o_proj its input (a copy of the output unless a view); the global call q_proj's output (qg is a slice of
    # it), k and v (h heads), its output and logsumexp; global_out its input
    saved = (I * by + o_copy * Qp + Q + KB + Qp + lse + o_copy * Qp
             + 2 * KVe + gq + lse_g + gq + keep)
    mask_build = Q + 2 * KVe + sp.Max(8 * Ik + 3 * Ik, by * (Ik + I) + Ik)
    blocks = Q + 2 * KVe + I * by + padded_q * Qp + padded_kv + KB
    call = Q + 2 * KVe + I * by + padded_q * Qp + q_copy * Qp + KB + Qp + lse
    result = Q + 2 * KVe + I * by + padded_q * Qp + Qp + o_copy * Qp
    o_proj = Q + 2 * KVe + Qp + out
    rows = Q + 2 * KVe + out + gq + lse_g + 2 * gq + b * G * s.d * by + 9 * keep
    phases = [mask_build, call, result, o_proj, blocks, rows]
    # backward: first the global rows' (y's gradient, its rows cut for global_out, whose input gradient is their
    # SDPA's output gradient; that SDPA's gradients of qg, k and v); then, the global call's saved tensors released
    # and its gradients accumulated, the band's SDPA gradients of its q, keys and values (where o_proj read a view
    # of the band's output, its gradient is copied to SDPA's layout, and q_proj's output, which the band keeps, is
    # not released)
    bwd = [out + 2 * gq + 2 * KVe, Qp + KB - gq - lse_g + (1 - o_copy) * (Qp + Q)]
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, 0, bwd_phases=bwd)
