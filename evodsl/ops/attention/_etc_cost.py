"""The cost of mha(etc) in the form that runs (etc.py), N the op's input length (G globals and the long input):

- N <= G: every position global, one SDPA call over [b, h, N, N] (softmax's cost; global_out in o_proj's place);
- else _dilated_band.dilated_band with d = 1 and g = G (the band layout of longformer's, _longformer_cost): nb
  blocks of B queries against G + K keys, [b, h, nb, B, G + K] scores in one SDPA call, k and v repeated to h
  heads for grouped K/V heads, o_proj on all N rows; then the G global queries (a slice of q) against all N keys,
  one SDPA call (hard g2l: a [G, N] bool mask), global_out on their G rows, written over o_proj's output.
The export's padded form (_exported) is not costed.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import sympy as sp

from ..cost import Cost, Symbols, linear, piecewise
from ..registry import OpEnv
from ._banded import band_layout
from ._common import LSE_BYTES, AttentionParams, attention_cost, head_symbols
from .softmax import softmax_attention_cost


def etc_cost(p: AttentionParams, env: OpEnv, s: Symbols) -> Cost:
    h, kv, dh = head_symbols(p, s)
    out_params = linear(s, h * dh, s.d, p.bias).params  # global_out
    if p.rel:
        full = _all_global_labels(p, s, out_params)
    else:
        full = softmax_attention_cost(p, env, s)
        full = replace(full, params=full.params + out_params, cache=0)
    return piecewise([(_sparse_cost(p, env, s), s.n > p.globals), (full, True)])


def _all_global_labels(p, s: Symbols, out_params) -> Cost:
    """N <= G with rel=k: every position global, one SDPA call whose float mask is the g2g labels' scores
    [b, h, N, N] (gathered by an int64 [N, N] index, built through four int64 temporaries); k and v repeated to
    h heads for grouped K/V heads; the math kernel in training (see _labels)."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    V = 2 * p.rel + 3
    sf, f32 = b * h * n * n, sp.Max(by, 4)
    Q, KV = b * n * h * dh * by, b * n * kv * dh * by
    Ke = Q if kv != h else 0  # the repeated k, v (views when kv = h)
    KVe = Q if kv != h else KV
    rel_mm = 2 * b * h * n * V * dh
    core = Cost(params=out_params + 2 * V * h * (dh + 1), fwd=4 * sf * dh + rel_mm, bwd=8 * sf * dh + 2 * rel_mm,
                fwd_other=5 * sf + b * h * n * V + sf, bwd_other=10 * sf + 2 * (b * h * n * V + sf))
    # saved: the label table's copy, q's copy (the einsum), the index, R, k and q scaled, the weights, v,
    # global_out's input
    saved = V * h * dh * by + Q + 8 * n * n + b * h * n * V * by + 2 * Q + sf * f32 + KVe + Q
    phases = [Q + 2 * KV + 2 * Ke + 32 * n * n + n * n,  # the index built
              Q + 2 * KV + 2 * Ke + 8 * n * n + sf * by + Q + LSE_BYTES * b * h * n]  # the call
    # backward: global_out's input gradient relaid; v's and the weights' gradients; then the scores'
    bwd = [KVe + sf * f32, 2 * sf * f32 - Q]
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, 0, bwd_phases=bwd)


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
    if p.rel:
        terms = BandTerms(G=G, nb=nb, B=B, I=I, scores=scores, gs=gs, Q=Q, KVe=KVe, Qp=Qp, KB=KB, gq=gq, lse=lse,
                          keep=keep, padded_q=padded_q, q_copy=q_copy)
        core, saved, phases, bwd = _labels(p, s, h, dh, core, saved, phases, bwd, terms)
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, 0, bwd_phases=bwd)


@dataclass(frozen=True)
class BandTerms:
    """The band's sizes and byte terms (the symbols of etc's cost above) that rel=k's labels adjust."""

    G: object
    nb: object
    B: object
    I: object  # noqa: E741 (block mask elements, as in the cost above)
    scores: object
    gs: object
    Q: object
    KVe: object
    Qp: object
    KB: object
    gq: object
    lse: object
    keep: object
    padded_q: object
    q_copy: object


def _labels(p, s, h, dh, core, saved, phases, bwd, v: BandTerms):
    """rel=k: each query's label scores R = q (a / sqrt(dh)) + c / sqrt(dh), [b, h, n, 2k + 3] (the global rows'
    [b, h, G, 2k + 3] from their own table), gathered per block into SDPA's float mask [b h, nb, B, G + K] (the
    global rows': [b, h, G, N]). That mask has a gradient, so in training both calls run SDPA's math kernel: it
    keeps q and k scaled (copies), v, and the float32 weights, and its backward counts 2x (8 scores dh, not 10)."""
    b, n, by, G = s.b, s.n, s.bytes, v.G
    V = 2 * p.rel + 3
    scores, gs, I, Qp, KB, Q, KVe = v.scores, v.gs, v.I, v.Qp, v.KB, v.Q, v.KVe
    gq, lse, keep, padded_q = v.gq, v.lse, v.keep, v.padded_q
    nb, B = v.nb, v.B
    tables = 2 * V * h * (dh + 1)
    rel_mm = 2 * b * h * (n + G) * V * dh
    core = replace(core, params=core.params + tables, fwd=core.fwd + rel_mm,
                   bwd=core.bwd - 2 * (scores + gs) * dh + 2 * rel_mm,
                   fwd_other=core.fwd_other + b * h * (n + G) * V + scores + gs,
                   bwd_other=core.bwd_other + 2 * (b * h * (n + G) * V + scores + gs))
    R = b * h * n * V * by  # the long rows' label scores, alive until the band returns
    Rpad = padded_q * b * h * nb * B * V * by  # ... padded to nb B rows (a copy)
    M = scores * by  # the band's float mask, one per (b, h)
    f32 = sp.Max(by, 4)
    mask_build, call, result, o_proj, blocks, rows = phases
    I_by = I * by
    phases = [mask_build + R, blocks + R,
              call - I_by + M + R, result - I_by + M + R, o_proj,
              call - v.q_copy * Qp - Qp - lse + R + Rpad + M + 8 * I,  # the gather, beside the window mask
              rows + gs * by + gq]
    # saved: the band's math kernel (q and k scaled, v's blocks, the weights), o_proj's input (a copy), q (the
    # label scores' einsum), the gather's index [nb, B, G + K]; the global rows' math kernel (qg and k scaled,
    # v, the weights), global_out's input, qg (a copy, for its einsum), the gather's index [G, N]
    # (the gather keeps what it read: R or its padded copy), the label tables (scaled copies), the global rows'
    # label scores
    saved = (Qp + KB + scores * f32 + Qp + Q + 8 * I + Rpad + (1 - padded_q) * R + 2 * V * h * dh * by
             + KVe + gq + Q + gs * f32 + gq + gq + 8 * G * n + keep + b * h * G * V * by)
    # backward: the global rows' first (math kernel), then o_proj's; when the band's begins, what they created
    # (the gradients of v, of k and of q from the global rows, the band's output gradient relaid) less what they
    # released (their v, k scaled and weights, global_out's input, qg's copies, the global table's copy, Rg,
    # o_proj's input) is S0; the band's kernel then makes v's blocks' and the weights' gradients, then (its output
    # gradient and v's blocks released) the scores', and later the float mask's gradient and its copy
    S0 = KVe - gs * f32 - 4 * gq - V * h * dh * by - b * h * G * V * by
    bwd = [S0 + KB / 2 + scores * f32, S0 + 2 * scores * f32 - Qp, S0 - Qp + 2 * scores * by]
    return core, saved, phases, bwd
