"""The cost of mha(longformer) in the form that runs (longformer.py):

- g = 0, d = 1: the banded kernel, banded_attention_cost (a band of w/2 each side, or w/2 back);
- otherwise _dilated_band.dilated_band: nb d blocks of B queries against g + K keys each (the band_layout of
  the M = ceil(n / d) sub-positions), [b, h, nb d, B, g + K] scores in one SDPA call, plus, with g > 0, the
  global rows: query_global on g rows, key_global and value_global on all n, one [g x n] SDPA call and o_proj
  on the g rows.
"""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from ._banded import band_layout, banded_attention_cost
from ._common import LSE_BYTES, AttentionParams, attention_cost, head_symbols


def longformer_cost(p: AttentionParams, env: OpEnv, s: Symbols) -> Cost:
    """Forward FLOPs: the projections, the band's 4 scores dh (SDPA) and the global rows'. Memory: what the
    torch code allocates (the phases below), for an unmasked call; see the module docstrings."""
    half = s.sym("w", p.window) / 2
    hi = 0 if env.causal else half
    if p.globals == 0 and p.dilation == 1:
        return banded_attention_cost(p, env, s, lo=half, hi=hi, cache_keys=half + 1)
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    g = s.sym("g", p.globals) if p.globals else 0
    dl = s.sym("dil", p.dilation)
    M = sp.ceiling(n / dl)
    B, nb, K, L = band_layout(M, half, hi)
    W = g + K  # keys per block
    Ik, I = nb * dl * B * K, nb * dl * B * W  # window and block mask elements (one for all b, h)
    scores = b * h * I
    Q, KV, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    KVe = Q if kv != h else KV  # k, v repeated to h heads (the projections' released)
    Qp = b * h * nb * B * dl * dh * by  # the blocked queries, padded to nb B d positions
    KB = 2 * b * h * nb * dl * W * dh * by  # the blocks' keys and values (a copy of the unfolded views)
    padded_q = sp.Min(1, nb * B * dl - n)
    several = sp.Min(1, nb - 1)
    # Layouts decide the copies. q comes as a view of q_proj's [b, n, h, dh] output, or padded (F.pad)
    # contiguous [b, h, ., dh]; SDPA's batch (b h, nb d) is a view of it where b and h merge (padded, or b = 1)
    # and nb and d do (one block, or d = 1), else a copy. SDPA lays its output out like its q: o_proj's
    # [b, n, h dh] input is a view of it when q was a view of q_proj's output, else one more copy. The global
    # rows' o_proj input likewise (b = 1).
    q_copy = sp.Min(1, (1 - padded_q) * (b - 1) + several * (dl - 1))
    o_copy = sp.Min(1, padded_q + q_copy)
    og_copy = sp.Min(1, b - 1)
    padded_kv = 2 * b * h * L * dl * dh * by * sp.Min(1, several + (L * dl - n))
    lse = LSE_BYTES * b * h * nb * dl * B
    gq = b * g * h * dh * by  # the global queries (and their output)

    other = 5 * scores + 10 * Ik
    core = Cost(fwd=4 * scores * dh, bwd=10 * scores * dh, fwd_other=other, bwd_other=2 * other)
    saved = I * by + Qp + KB + Qp + lse + o_copy * Qp  # q, k, v, o, the logsumexp, the mask; o_proj's input
    # building the mask: an int64 difference of the [nb, B, K] sub-positions beside three bool masks, then the
    # additive mask beside the window's part and its bool
    mask_build = Q + 2 * KVe + sp.Max(8 * Ik / dl + 3 * Ik, by * (Ik + I) + Ik)
    # the keys' blocks copied (with the global keys, or for SDPA) while the padded K and V are alive
    blocks = Q + 2 * KVe + I * by + padded_q * Qp + padded_kv + KB
    if g:  # the blocks' keys are the concatenations, the padded K and V released
        keys_call = keys_after = KB
    else:  # SDPA reads the unfolded views, copied unless they are one block of the padded (or contiguous:
        # grouped, or b = 1) K and V
        kb_copy = sp.Min(1, several + (1 - sp.Min(1, L * dl - n)) * (b - 1) * (1 if kv == h else 0))
        keys_call, keys_after = padded_kv + kb_copy * KB, padded_kv
    call = Q + 2 * KVe + I * by + padded_q * Qp + q_copy * Qp + keys_call + Qp + lse
    result = Q + 2 * KVe + I * by + padded_q * Qp + keys_after + Qp + o_copy * Qp
    o_proj = Q + 2 * KVe + Qp + out
    phases = [mask_build, call, result, o_proj] + ([blocks] if g else [])
    # backward: o's gradient (a copy in SDPA's layout where o_proj's input was one), then those of q, k, v
    kernel_bwd = (1 - o_copy) * Qp + Qp + KB
    bwd = []
    if g:
        glob = (linear(s, s.d, h * dh, p.bias, tokens=b * g) + linear(s, s.d, kv * dh, p.bias).scaled(2)
                + linear(s, h * dh, s.d, p.bias, tokens=b * g))  # query_global, key_ and value_global; o_proj
        gs = b * h * g * n
        core = core + Cost(params=glob.params - (h * dh * s.d + (s.d if p.bias else 0)), fwd=glob.fwd + 4 * gs * dh,
                           bwd=glob.bwd + 10 * gs * dh, fwd_other=5 * gs, bwd_other=glob.bwd_other + 10 * gs)
        lse_g = LSE_BYTES * b * h * g
        saved = saved + 2 * gq + og_copy * gq + 2 * KV + lse_g
        phases.append(out + 2 * KV + 3 * gq + b * g * s.d * by)
        # backward, first the global rows (the written-over gradient of y cloned): their SDPA's gradients of
        # qg, kg, vg; then, the global rows' saved tensors released and the input's gradient begun, the band's
        bwd.append(out + 2 * gq + 2 * KV)
        # then key_global's and value_global's gradients of the input beside their sum and y's, dk and dv
        # released with the global rows' saved tensors
        bwd.append(4 * out - 2 * KV - gq - lse_g)
        kernel_bwd = kernel_bwd + out - 2 * KV - 2 * gq - lse_g - og_copy * gq
    bwd.append(kernel_bwd)
    if p.dropout > 0:  # training runs SDPA's math kernel (float32 for 16-bit dtypes), whose backward counts 2x
        fl = max(by, 4) / by
        gs = b * h * g * n
        core = replace(core, bwd=core.bwd - 2 * (scores + gs) * dh)
        # it keeps q and k scaled, v, the weights, the dropout's mask and the dropped weights; its output is
        # contiguous, so o_proj's input is a copy
        saved = (Qp + KB) * fl + 3 * scores * 4 * fl + Qp
        # backward: the gradients of v and of the dropped weights; with globals, first the global rows' (y's
        # gradient cloned), then the input's begun from them, their saved tensors released
        bwd = [KB / 2 + 4 * fl * scores]
        if g:
            saved = saved + (gq + 2 * Q) * fl + 3 * gs * 4 * fl + gq
            released = Q + 3 * 4 * fl * gs + (2 + og_copy) * gq
            bwd = [out + Q + 4 * fl * gs, 4 * out - 2 * Q - 3 * 4 * fl * gs - gq, KB / 2 + 4 * fl * scores - released]
    cache = 2 * b * sp.Min(n, dl * half + 1) * kv * dh * by
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache, bwd_phases=bwd)
