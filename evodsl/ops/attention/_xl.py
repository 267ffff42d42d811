"""Softmax attention's Transformer-XL path: keys and values over a segment memory (memory(xl, mem_len=M)) and/or
XL's relative scores (pos(xl_rel)). Used by mha(softmax) when either reaches it.

The segment's n queries read L = M' + n keys, the M' <= M carried inputs first (model.recur's SegmentState; none
in an ordinary forward, a first segment): causal query i reads keys j <= M' + i. With pos(xl_rel) the position
and bias terms are a float mask [b, h, n, L] that SDPA adds to q·k (all scaled): A_ij of the paper. Decoding
(a K/V cache) is the same computation with the cache in the memory's place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...decode import append_kv, slot


def xl_forward(att, x: torch.Tensor, ctx) -> torch.Tensor:
    """att: a SoftmaxAttention with `mem_len` (0: no memory) and possibly an XLRelative `pos`."""
    b, n, _ = x.shape
    state = ctx.extra.get("segments") if ctx is not None else None
    if ctx is not None and ctx.cache is not None:  # decoding: the cache plays the memory
        q, k, v = att.qkv(x)
        k, v = append_kv(ctx, att, k, v)
    else:
        key = slot(ctx, att) if state is not None else None
        mem = state.memory.get(key) if key is not None else None
        h = x if mem is None else torch.cat((mem, x), dim=1)
        if key is not None and att.mem_len:  # the next segment's memory: the last M inputs, no gradient
            state.memory[key] = h[:, -att.mem_len:].detach().clone()
        L = h.shape[1]
        q = att.q_proj(x).view(b, n, att.heads, att.head_dim).transpose(1, 2)
        k = att.k_proj(h).view(b, L, att.kv_heads, att.head_dim).transpose(1, 2)
        v = att.v_proj(h).view(b, L, att.kv_heads, att.head_dim).transpose(1, 2)
        del h
    L = k.shape[2]
    keep = _keep(att, ctx, n, L, x.device)
    if att.pos is not None:  # XL's relative terms, as a float mask SDPA adds to the scores
        scale = att.scale or att.head_dim ** -0.5
        mask = att.pos.scores(q, att.expand_kv(k), att.causal).mul_(scale)
        if keep is not None:
            mask = mask.masked_fill(~keep, float("-inf"))
    else:
        mask = keep
    drop = att.dropout if att.training else 0.0
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop,
                                       is_causal=att.causal and mask is None, scale=att.scale,
                                       enable_gqa=att.kv_heads != att.heads)
    return att.out(o)


def _keep(att, ctx, n: int, L: int, device):
    """Which keys each query may read, bool [n, L] or [b, 1, n, L]: causal, query i reads keys j <= L - n + i
    (the memory is before the segment); padded keys of the segment are excluded (the memory is all tokens). A
    query with no key left reads its own. None when nothing is excluded (bidirectional, no padding; or causal
    with no memory, where SDPA's is_causal serves) and no relative scores need a mask."""
    key_mask = att.key_mask(ctx) if ctx is not None and ctx.cache is None else None
    if key_mask is None and (not att.causal or (L == n and att.pos is None)):
        return None
    i = torch.arange(L - n, L, device=device)[:, None]
    j = torch.arange(L, device=device)[None, :]
    keep = j <= i if att.causal else torch.ones(n, L, dtype=torch.bool, device=device)
    if key_mask is not None:
        full = torch.cat((key_mask.new_ones(key_mask.shape[0], L - n), key_mask), dim=1)
        keep = keep & full[:, None, None, :]
        keep = keep | ((i == j) & ~keep.any(-1, keepdim=True))
    return keep


def xl_attention_cost(p, env, s, h, kv, dh):
    """The XL path over L = n + M keys (M: mem_len, the steady state of a full memory; 0 without one). Symbols
    as in _common. Forward: q from the n new positions, k and v from the L (the [b, L, d] concatenation is kept
    for their backward), SDPA over [b, h, n, L]. With pos(xl_rel): its W = L + 1 distances (L + n
    bidirectionally), W_R R [W, D] and (q + v) against it [b, h, n, W] (the rows shifted by a view), u against
    the keys, the float mask [b, h, n, L] that SDPA adds; the mask has a gradient, so SDPA runs its math kernel
    (q and k scaled, K/V heads expanded, the weights kept). Without it, the fused kernel with the causal band
    as a mask, which the kernel keeps as floats [n, L]. The carried state: the last M inputs, [b, M, d] (with
    no memory, decoding's K/V cache)."""
    from ..cost import Cost
    from ._common import LSE_BYTES, attention_cost

    b, n, by, d = s.b, s.n, s.bytes, s.d
    M = s.sym("M", env.memory[1].mem_len) if env.memory else 0  # cost.MEM: a length in the complexity class
    L, D = n + M, h * dh
    rel = env.pos is not None
    causal = env.causal
    q, kvb, out = b * n * D * by, b * L * kv * dh * by, b * n * d * by
    full_k = b * L * D * by  # a K or V of L keys with every query head
    scores = b * h * n * L
    cat = b * L * d * by if env.memory else 0  # [mem ∘ x], kept for the k/v projections' backward
    state = b * M * d * by  # the next segment's memory, a copy
    keep = n * L if causal and (rel or env.memory) else 0  # the bool band [n, L]
    # the k/v projections run over L rows (the shared formula counts n): the difference
    extra_kv = Cost(fwd=2 * 2 * b * M * d * kv * dh, bwd=2 * 4 * b * M * d * kv * dh,
                    bwd_other=(2 * b * M * kv * dh if p.bias else 0))
    if rel:
        W = L + 1 if causal else L + n
        pos = env.pos[0].attach_cost(env.pos[1], s, h, kv, dh, keys=L, causal=causal)
        core = Cost(fwd=4 * scores * dh, bwd=8 * scores * dh, fwd_other=5 * scores, bwd_other=10 * scores)
        # saved: W_R's input R, the head-expanded copy of W_R R the batched matmul makes, q + v, k (or its
        # head-expanded copy) and u's batched copy for u·k, the mask's bool band; the math kernel's scaled q and
        # k, V (its K/V heads expanded, or v itself), the weights; o_proj's copy of the output
        saved = (cat + W * D * by + b * W * D * by + q + full_k + b * D * by + keep
                 + q + 2 * full_k + scores * by + q)
        phases = [cat + state + q + 2 * kvb,  # the projections
                  state + q + 2 * kvb + keep + 8 * W + W * D * by + b * h * n * W * by + b * h * L * by
                  + scores * by,  # (q + v)·W_R R beside the sum of the scores' terms
                  state + q + 2 * kvb + 2 * keep + 2 * scores * by,  # the band applied (causal)
                  state + q + 2 * kvb + keep + scores * by + q + out]  # at o_proj
        bwd = [2 * scores * by - q,  # the math kernel: the weights' gradient and the scores'
               -(q + full_k + b * D * by) + b * h * n * (2 * W - 1 - L) * by]  # the shifted rows' gradient
    else:
        pos = Cost()
        core = Cost(fwd=4 * scores * dh, bwd=10 * scores * dh, fwd_other=5 * scores, bwd_other=10 * scores)
        band = n * L * by if keep else 0  # SDPA's float copy of the band, kept
        saved = cat + q + 2 * kvb + q + LSE_BYTES * b * h * n + band
        phases = [cat + state + q + 2 * kvb,
                  state + q + 2 * kvb + keep + band + q + LSE_BYTES * b * h * n,  # in SDPA: the band as floats
                  state + q + 2 * kvb + keep + q + out]  # at o_proj (SDPA's output in o_proj's layout)
        bwd = [2 * q + 2 * kvb]
    carried = state if env.memory else 2 * b * n * kv * dh * by  # the segment memory, or (decoding) the K/V cache
    cost = attention_cost(p, s, h, kv, dh, core, pos, saved, phases, cache=carried, bwd_phases=bwd)
    return _with(cost, extra_kv)


def _with(cost, extra):
    """cost with extra's FLOPs added (its flags and memory kept)."""
    from dataclasses import replace

    return replace(cost, fwd=cost.fwd + extra.fwd, bwd=cost.bwd + extra.bwd, bwd_other=cost.bwd_other + extra.bwd_other)
