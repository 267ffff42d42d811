"""The cost of the explicit-score kernel (_scored.py) that runs mha(softmax) and mha(local) with softcap=, sinks=
or sink_logit=, written from its row blocks (conventions: _common.py).

Scores per sequence and head, I: "full" layout (the band covers n), blocks of B = min(n, 64) queries, nb of them,
the last r = n - (nb - 1) B long: causal, block c reads keys 0 .. e_c - 1, I = B^2 (nb - 1) nb / 2 + r n
(the blocks past the diagonal skipped); bidirectional I = n^2. "band" layout, B = min(n, max(32, lo, hi)):
block c reads its S + B_c + lo + hi keys, I = (nb - 1) B (S + B + lo + hi) + r (S + r + lo + hi).
Matmuls: q k^T and w v, 4 I dh forward, twice that backward (explicit matmuls). Elementwise: the scale 1, the cap
(divide, tanh, multiply) 3, the mask 1, softmax 5 per score.
ALiBi (pos(alibi)) adds its bias block by block after the cap: its attach_cost for the I pairs and the largest
block's, whose bias [h, ...] and int64 distances live beside its scores.
Memory: autograd keeps, per block, the weights (with the sink logit, one column more), the tanh (softcap) and the
bool mask; the keys and values the matmuls read: the expanded (GQA) or zero-padded (band) copies, or each block's
[S + K] keys with sinks; q made contiguous. Without autograd the kernel works in place: one block's scores and
weights live at once.
"""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..cost import Cost, Symbols, piecewise
from ..registry import OpEnv
from ._common import attention_cost, head_symbols, position_cost, rotates
from ._softcap import rotations
from ._scored import FULL_BLOCK, MIN_BAND_BLOCK


def _full(n, causal):
    """(I, the largest block's scores, B, nb, the last block's scores, the one before it's) of the full layout."""
    B = sp.Min(n, FULL_BLOCK)
    nb = sp.ceiling(n / B)
    r = n - (nb - 1) * B
    if causal:
        return B ** 2 * (nb - 1) * nb / 2 + r * n, sp.Max(r * n, B * (n - r)), B, nb, r * n, B * (n - r)
    return n ** 2, B * n, B, nb, r * n, B * n


def _band(n, lo, hi, S):
    """(I, the scores of all blocks at once, B, nb, ., .) of the band layout: nb B padded query rows."""
    B = sp.Min(n, sp.Max(MIN_BAND_BLOCK, lo, hi))
    nb = sp.ceiling(n / B)
    I = nb * B * (S + B + lo + hi)
    return I, I, B, nb, I, I


def scored_cost(p, env: OpEnv, s: Symbols) -> Cost:
    h, kv, dh = head_symbols(p, s)
    n, causal = s.n, env.causal
    window = getattr(p, "window", None)
    kept = n  # decoding: softmax keeps every key; local the last w and the first S
    if window is not None:
        w = s.sym("w", window)
        kept = sp.Min(n, w) + (sp.Min(s.sym("S", p.sinks), n) if p.sinks else 0)
    cache = 2 * s.b * kv * dh * s.bytes * kept
    whole = _cost(p, env, s, h, kv, dh, *_full(n, causal), band=None, S=0, cache=cache)
    if window is None:
        return whole
    lo, hi = sp.Min(w - 1, n - 1), (0 if causal else sp.Min(w - 1, n - 1))
    S = sp.Min(s.sym("S", p.sinks), n) if p.sinks else 0
    band = _cost(p, env, s, h, kv, dh, *_band(n, lo, hi, S), band=(lo, hi), S=S, cache=cache)
    return piecewise([(whole, n <= w), (band, True)])


def _cost(p, env, s, h, kv, dh, I, top, B, nb, last, before, band, S, cache) -> Cost:
    b, n, by = s.b, s.n, s.bytes
    cap, logit = p.softcap is not None, bool(getattr(p, "sink_logit", False))
    talk = bool(getattr(p, "talking", False))  # talking heads: the scores and the weights mixed across heads
    # H: the softmax heads between the mixings (talking=H; h otherwise), which the mask and the softmax run on
    H = s.sym("H", p.talking) if talk and p.talking is not True else h
    # a score bias (ALiBi's, _softcap.inside()) is built block by block: its cost for this kernel's I pairs a
    # sequence, the largest block's top at once, never SDPA's [h, n, n]
    biased = env.pos is not None and env.pos[0].variant not in rotations()
    pos = env.pos[0].attach_cost(env.pos[1], s, h, kv, dh, pairs=I, top=top) if biased else \
        position_cost(env, s, h, kv, dh)
    scores, mixed_scores = b * h * I, b * H * I
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    qkv = q + 2 * kvb
    grouped = 2 * q if kv != h else 0  # k, v repeated to h heads
    rows = n if band is None else nb * B  # query rows, padded to whole blocks in the band layout
    col = b * H * rows * by if logit else 0  # the sink logit's column, one per query row and softmax head
    # the scale and the cap on the h heads' scores, the mask and the softmax on the H heads'
    other = (1 + (3 if cap else 0)) * scores + (1 + 5) * mixed_scores + (2 * b * H * rows if logit else 0)
    mixing = 4 * h * mixed_scores if talk else 0  # [H, h] x [h, I] (P_l) and [h, H] x [H, I] (P_w) per sequence
    core = Cost(fwd=4 * scores * dh + mixing, bwd=8 * scores * dh + 2 * mixing, fwd_other=other, bwd_other=2 * other)
    mask = I  # the bool masks (shared by the sequences and heads)
    rotated = rotates(env)
    weights = mixed_scores * by + (scores * by if cap else 0) + col  # the weights (H heads; and the tanh, h)
    # talking: the scaled scores P_l reads, the mixed weights w @ v reads (with the logit's column cut off, the
    # weights P_w reads are a copy, H heads)
    weights += 2 * scores * by + (mixed_scores * by if logit else 0) if talk else 0
    block = b * h * top * by  # the largest block's scores (band: all of them)
    blockH = b * H * top * by  # its mixed scores (H heads)
    # without autograd: the mixed scores beside the scores, the mixed weights (h heads)
    mixed = blockH + block if talk else 0
    if band is None:
        keys = 2 * q if kv != h else 2 * kvb  # the matmuls read k and v (made contiguous)
        # k and v made contiguous, unless repeated to h heads (k: or rotated)
        kv_copy = 0 if kv != h else (0 if rotated else kvb) + kvb
        saved = q + keys + weights + mask + q + pos.saved  # q, the keys and values read, the weights, the mask, o
        # without autograd: one block's scores and weights (with the logit: the scores, their concatenation with
        # the logit's column and its softmax), its bool mask and the mask's negation
        blocks = (block + 2 * blockH + 2 * b * H * B * by if logit else block + blockH) + 2 * top + mixed
        q_copy = 0 if rotated else q  # q made contiguous [b, h, n, dh]
        # w @ v: a block's weights (with the logit: its softmax's column too) beside the product, B x dh a head,
        # before it is copied into o (wide heads, dh > the block's keys, make this the larger)
        wv = block + (b * h * B * by if logit else 0) + b * h * B * dh * by
        phases = [qkv + grouped + q_copy + kv_copy + q + blocks, qkv + grouped + q_copy + kv_copy + q + wv,
                  qkv + q + out]
        # backward, blocks in reverse: the last block's weights' and scores' gradients (o's saved copy and its
        # gradient's released); then the block before it's beside o's gradient and the accumulated gradients of
        # q, k and v, the last block's saved tensors released
        last_saved = ((2 if cap else 1) * b * h * by + 1) * last  # its weights (tanh), its mask
        acc = 2 * q  # measured: q's gradient and one more q-sized one
        more = sp.Min(1, nb - 1)  # 0 with one block
        g_last, g_B = b * h * (n - (nb - 1) * B) * dh * by, b * h * B * dh * by  # a block's rows of o's gradient
        bwd = [2 * b * h * last * by - q, more * (q + acc + 2 * b * h * before * by - last_saved),
               # read from the allocations (wide heads, dh large beside the blocks' keys): the last block's
               # rows of o's gradient (a copy, and with several blocks a zero-filled one) beside o's gradient
               # (the slices' scatter: o's saved copy released)
               q + g_last * (1 + more),
               # the block before the last: q's, k's and v's accumulated gradients and o's, its own rows of o's
               # gradient (copy and zeros), or its v gradient scattered into a full-size one and added (two
               # q-sized) beside its weights' gradient; the last block's saved tensors released
               more * (4 * q + 2 * g_B - last_saved), more * (5 * q + b * h * before * by - last_saved)]
        if talk:  # measured: each mixing's backward releases what it saved as it makes its gradient; one block's
            # gradient beside q's (the last block), or the block before it's (beside half of q's unless rotated or
            # with the sink logit; with the cap, the last block's saved tanh released by then)
            capped = b * h * last * by if cap else 0
            bwd = [b * h * last * by + q, more * (b * h * before * by + (0 if rotated or logit else q / 2) - capped)]
            if H != h:  # H softmax heads (read from the allocations, traced per op); L, Bf: one softmax head's
                L, Bf = b * last * by, b * before * by  # scores, the last block's and the one before it's
                if logit:  # the weights P_w reads are a copy, released before the softmax's gradient is made: one
                    # block's weights' gradient (H heads) beside q's; H < h: the block before's w @ v gradient
                    # (h heads), the last block's weights and their copy (H heads, fewer) released by then
                    bwd += [H * L + q * (2 * more - 1), more * (H * Bf - 2 * H * L + q),
                            more * (h * Bf + 2 * (h - H) * L - q)]
                else:  # H < h: as with the logit, the last block's weights alone released; H > h: a block's
                    # weights' and mixed scores' gradients (H heads each) beside q's (one block: o's saved copy
                    # released), its saved mixed weights (h) released; or the block before's, the last block's
                    # saved weights (H) released too
                    bwd += [more * (h * Bf + (h - H) * L + q / 8 - capped), 2 * H * L - h * L + q * (2 * more - 1),
                            more * (2 * H * Bf - H * L - h * Bf + q / 4 - capped)]
    else:
        lo, hi = band
        qb = b * h * nb * B * dh * by  # q's blocks: padded to nb B rows, or made contiguous (rope's already is)
        made = sp.Min(1, nb * B - n) if rotated else 1  # is that a new tensor?
        padded = 2 * b * h * (nb * B + lo + hi) * dh * by  # k, v zero-padded, read as an unfold
        # the matmuls read each block's keys and values as a copy: the unfold's, or with sinks the concatenation's
        keys = 2 * b * h * nb * (S + B + lo + hi) * dh * by
        built = keys if S != 0 else padded  # with sinks the padded ones are released (the matmuls' copies of the
        # unfold are gone before the weights exist)
        saved = qb + keys + weights + mask + q + pos.saved  # q's blocks, the keys, the weights, the mask, o_proj's copy
        # without sinks the unfolded keys (values) are no matmul operand as they are: bmm copies them (keys / 2
        # each) and frees the copy after the product (q k^T's copy beside the scores: less than w @ v's phase)
        copy = keys / 2 if S == 0 else 0
        phases = [qkv + grouped + made * qb + built + (block + 2 * blockH + 2 * col if logit else block + blockH)
                  + 2 * mask + mixed,
                  qkv + grouped + made * qb + built + copy + block + col + qb,  # weights @ values (the values' copy)
                  qkv + qb + q + out]  # o_proj: the blocks' output and its copy
        # read from the allocations: the blocks' rows of o's gradient (nb B, padded: a copy), the weights' gradient
        # and the values' beside each other, o_proj's saved copy of o (q) released by then; or, a step later, the
        # softmax's gradient beside the weights' and the values', the saved copy of the values (keys / 2) released
        bwd = [qb + block + col + keys / 2 - q, 2 * (block + col) - q]
        if talk:  # measured: q's blocks' gradient is gone by then; with H > h heads, the weights' and the mixed
            # scores' gradients (H heads each; with the logit the weights' alone), the saved mixed weights (h) and
            # q's blocks' gradient released
            bwd = [block + col + keys / 2, blockH - q if logit else 2 * blockH - block - q]
    if biased:  # the largest block's bias (and what builds it) beside its scores, added in place
        phases.append(qkv + grouped + (q if band is None else made * qb) + (0 if band is None else built) + block
                      + mask + pos.peak)
    elif env.pos is not None:
        phases.append(qkv + pos.peak)
    cost = attention_cost(p, s, h, kv, dh, core, pos, saved, phases, cache, bwd_phases=bwd)
    # the sink logits, one per softmax head; talking heads' P_l and P_w, h x H and H x h
    return replace(cost, params=cost.params + (H if logit else 0) + (2 * h * H if talk else 0))
