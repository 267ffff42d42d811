"""The cost of mha(tglobal) (tglobal.py), in the form eager PyTorch runs without padding: blocks of B queries
(_banded.band_layout: nb blocks, K band keys each) against their band and the g = floor(n / l) global keys,
[b, h, nb, B, K + g] scores in one SDPA call with an additive [h, nb, B, K + g] mask. The mask has a gradient
(the global bias table's, and T5's), so in training SDPA runs its math kernel (float32 for 16-bit dtypes), which
keeps the weights; at inference, the fused kernel.

Conventions as _common.py's. Sizes in bytes: Gx the global inputs [b, g, d], Gk their keys [b, g, kv dh], S the
side table [h, g, g], KC each of the blocked keys and values [b, h nb, K + g, dh], M the mask, QB the blocked
queries [b, h nb, B, dh] (and the kernel's output), W the weights, tile the band of one block [B, K] (with
T5's bias [h, B, K]). The int64 block of every position (8 n) lives
through the forward; building the mask, the int64 positions of the padded queries and of the band's keys, and
the side rows of every query [h, nb B, g] beside the mask. A sequence shorter than a block (g = 0) is costed as
one with global keys (its mask then has no gradient: the fused kernel runs in training too)."""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from ._banded import band_layout
from ._common import LSE_BYTES, attention_cost, head_symbols


def tglobal_cost(p, env: OpEnv, s: Symbols) -> Cost:
    h, kv, dh = head_symbols(p, s)
    b, n, by, d = s.b, s.n, s.bytes, s.d
    r, l = s.sym("r", p.radius), s.sym("l", p.block)
    g = sp.floor(n / l)
    B, nb, K, L = band_layout(n, r, r)
    several = sp.Min(1, nb - 1)  # several blocks: k and v are padded (left and right) before the view
    fb = max(by, 4)  # the math kernel computes in float32 for 16-bit dtypes
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * d * by
    Gx, Gk, S = b * g * d * by, b * g * kv * dh * by, h * g ** 2 * by
    KC, QB = b * h * nb * (K + g) * dh * by, b * h * nb * B * dh * by
    M, scores = h * nb * B * (K + g) * by, b * h * nb * B * (K + g)
    W = scores * fb
    tile = (h if env.pos is not None else 1) * B * K * by  # the band of one block, with T5's bias per head
    pad = b * kv * L * dh * by * several  # k or v padded
    t5 = env.pos is not None  # T5's bias on the band's tile

    glob = replace(linear(s, d, kv * dh, p.bias, tokens=b * g).scaled(2), params=0, saves_input=False)
    tables = Cost(params=d + p.buckets * p.heads)
    other = 5 * scores + 2 * h * nb * B * (K + g) + b * n * d + 4 * b * g * d  # softmax; the mask (cat, fill);
    # the block sums; their norm
    core = Cost(fwd=4 * scores * dh, bwd=8 * scores * dh, fwd_other=other, bwd_other=2 * other)
    weights = 3 if p.dropout > 0 else 1  # with dropout also its float mask and the dropped weights
    # kept: the norm's sums, its product and its output (read by the k and v projections), rsqrt per token;
    # the side rows' int64 index and the distances' buckets; the bool mask of the keys outside the sequence;
    # the math kernel's scaled q and k, v, the weights; o_proj's copy of the output; T5's tile: its buckets
    saved = (3 * Gx + b * g * by + 8 * nb * B + 8 * (2 * g - 1) + nb * (K + g)
             + (QB + 2 * KC) * fb / by + weights * W + q + (9 * B * K if t5 else 0))
    base = q + 2 * kvb + 8 * n + 2 * Gk + S  # alive through _attend
    phases = [base + 2 * KC + pad,  # v's blocked keys made
              base + 2 * KC + (sp.Max(33 * B * K, 2 * tile + B * K) if t5 else 17 * B * K),  # the tile built:
              # T5's buckets of the B K distances (int64), or the bias beside the tile; else |t - c| (int64)
              base + 2 * KC + tile + 16 * nb * B + 8 * nb * K + h * nb * B * g * by + M,  # the mask (cat)
              base + 2 * KC + M + 2 * QB + LSE_BYTES * b * h * nb * B,  # the kernel
              base + QB + q + out]  # at o_proj
    # backward (with respect to the input: the mask's gradient is not needed): the gradient of the output in
    # the blocked layout, o_proj's copy released; v's and the weights'; then the scores' (softmax) beside the
    # weights' (with dropout, the dropped weights are released first)
    bwd = [QB + KC * fb / by + W - q] + ([] if p.dropout > 0 else [2 * W - q])
    return attention_cost(p, s, h, kv, dh, core + glob + tables, Cost(), saved, phases, cache=0, bwd_phases=bwd)
