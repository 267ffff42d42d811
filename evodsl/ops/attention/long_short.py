"""mha(long_short, w=W, r=R): Transformer-LS, long-short attention (Zhu et al. 2021), bidirectional.

Each query attends the union of two key sets under one softmax. Short term: a segment-wise sliding window, the
sequence cut into segments of w positions, each query reading the keys of its own segment and the e = w // 2
positions on either side of it (clipped to the sequence). Long term: r keys and values per K/V head from a
dynamic projection of the whole sequence, P = softmax over positions of X W^P ([n x r] per K/V head),

    K_bar = P^T K,  V_bar = P^T V,                                                   [r x dh]

DualLN: one LayerNorm (over the K/V width, kv_heads * dh) for the window's keys and values, another for the
projected ones. Per head, with s_tj = q_t . k_j / sqrt(dh),

    o_t = sum_{j in G u W(t)} softmax_j(s_tj) v_j,   G = {LN_G(K_bar_i), LN_G(V_bar_i)},  W(t) = {LN_L(k_j), LN_L(v_j)}

O(n (w + r) dh) time and memory. Computed blockwise, one block per segment: the r projected keys put before the
segment's w + 2e window keys, one SDPA call over all segments. The paper's causal form (per-segment projections
read by the later segments) is not built: causal="no". Padding: padded keys leave the window and get no weight in
P; the segments are anchored at position 0, so only right padding keeps them where the sequence alone has them
(left padding is refused, E409). No position scheme inside (rope or ALiBi on projected keys has no meaning).
"""
from __future__ import annotations

import math

import sympy as sp
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..cost import Cost, Symbols, linear
from ..registry import Op, OpEnv, register, require_right_padding
from ._banded import _band_mask, _without_padded_keys, band_blocks
from ._common import LSE_BYTES, AttentionBase, AttentionParams, attention_cost, attention_shape, head_symbols


class LongShortParams(AttentionParams):
    w: int = Field(64, ge=1, le=1 << 20, description="segment length: a query reads its segment and w // 2 keys "
                                                     "on either side")
    r: int = Field(16, ge=1, le=1 << 16, description="keys and values from the dynamic projection, per K/V head")


class LongShortAttention(AttentionBase):
    def __init__(self, p: LongShortParams, env: OpEnv):
        super().__init__(p, env)
        self.w, self.r = p.w, p.r
        width = self.kv_heads * self.head_dim
        self.dproj = nn.Linear(env.d, self.kv_heads * p.r, bias=p.bias)  # W^P, r columns per K/V head
        self.ln_local, self.ln_global = nn.LayerNorm(width), nn.LayerNorm(width)  # DualLN

    def forward(self, x, ctx):
        b, n, _ = x.shape
        h, kvh, dh, r = self.heads, self.kv_heads, self.head_dim, self.r
        key_mask = self.key_mask(ctx)
        require_right_padding(key_mask, "mha(long_short)", "its segments start at position 0, and left padding moves "
                                                           "the tokens")  # exported: right padding assumed
        q = self.q_proj(x).view(b, n, h, dh).transpose(1, 2)
        p = self.dproj(x)  # [b, n, kv * r]
        if key_mask is not None:
            p = p.masked_fill(~key_mask[:, :, None], float("-inf"))
        # P^T [b, kv, r, n]: softmax over its last axis, in the layout both matmuls read uncopied
        p = p.view(b, n, kvh, r).permute(0, 2, 3, 1).contiguous().softmax(-1)

        def heads(t):  # [b, m, kv * dh] -> [b, kv, m, dh]
            return t.view(b, t.shape[1], kvh, dh).transpose(1, 2)

        def short_long(t, p):  # LN_L(t) and LN_G(P^T t), from t = K or V [b, n, kv * dh]
            bar = (p @ heads(t)).transpose(1, 2).reshape(b, r, kvh * dh)
            return heads(self.ln_local(t)), heads(self.ln_global(bar))

        kl, kg = short_long(self.k_proj(x), p)
        vl, vg = short_long(self.v_proj(x), p)
        del p
        o = segment_attention(q, kl, vl, kg, vg, self.w, key_mask, self.dropout if self.training else 0.0)
        return self.out(o)


def segment_attention(q, kl, vl, kg, vg, w: int, key_mask=None, dropout: float = 0.0) -> torch.Tensor:
    """q [b, h, n, dh]; the window's kl, vl [b, kv, n, dh]; the projected kg, vg [b, kv, r, dh] -> [b, h, n, dh]:
    query t of segment c = t // w reads kg and the keys c*w - e .. c*w + w - 1 + e (e = w // 2) in the sequence.
    _banded's layout with blocks of B = w queries against K = w + 2e keys (one block of every key when n <= w),
    its mask with a band wide enough to take the whole block, the r projected keys put in front of each block."""
    b, h, n, dh = q.shape
    kvh, r, g = kl.shape[1], kg.shape[2], h // kl.shape[1]
    if not isinstance(n, int) or torch.jit.is_tracing():
        return _gathered_segments(q, kl, vl, kg, vg, w, key_mask, dropout)
    e = w // 2
    lo, hi, B, nb, left, K = band_blocks(n, e, e, block=w)
    right = (nb - 1) * B + K - left - n
    mask = _band_mask(n, lo + B, hi + B, B, nb, left, K, None, q.dtype, q.device)  # [1, nb, B, K]
    if key_mask is not None:
        mask = _without_padded_keys(mask, key_mask, n, B, nb, left, K)[:, 0]  # [b, nb, B, K]
    mask = F.pad(mask, (r, 0))  # the projected keys: every query reads them
    mask = mask if mask.shape[0] == 1 else mask[:, None].expand(b, h, nb, B, r + K).reshape(b * h, nb, B, r + K)

    def blocked(t, bar):  # [b*h, nb, r + K, dh]: bar, then the block's window (heads repeated in the one copy)
        win = (F.pad(t, (0, 0, left, right)) if left or right else t).unfold(2, K, B).transpose(-1, -2)
        return torch.cat([bar[:, :, None, None].expand(b, kvh, g, nb, r, dh),
                          win[:, :, None].expand(b, kvh, g, nb, K, dh)], dim=4).view(b * h, nb, r + K, dh)

    qb = (F.pad(q, (0, 0, 0, nb * B - n)) if nb * B > n else q).reshape(b * h, nb, B, dh)
    o = F.scaled_dot_product_attention(qb, blocked(kl, kg), blocked(vl, vg), attn_mask=mask, dropout_p=dropout)
    return o.reshape(b, h, nb * B, dh)[:, :, :n]


def _gathered_segments(q, kl, vl, kg, vg, w: int, key_mask, dropout: float) -> torch.Tensor:
    """The same attention for a symbolic n (torch.export, ONNX export with a dynamic sequence axis): each query
    gathers its segment's W = w + 2e window keys, [b, h, n, W, dh], O(n (w + r)) and never n x n, with shapes that
    only scale n."""
    n, dh, g = q.shape[2], q.shape[3], q.shape[1] // kl.shape[1]
    e, r = w // 2, kg.shape[2]
    kl, vl, kg, vg = (t.repeat_interleave(g, dim=1) if g > 1 else t for t in (kl, vl, kg, vg))
    i = torch.arange(n, device=q.device).unsqueeze(1)
    j = torch.div(i, w, rounding_mode="floor") * w - e + torch.arange(w + 2 * e, device=q.device)  # [n, W]
    inside = (j >= 0) & (j < n)
    jc = j.clamp(0, n - 1)
    kw, vw = kl[:, :, jc], vl[:, :, jc]  # [b, h, n, W, dh]
    if key_mask is not None:
        inside = inside & key_mask[:, jc].unsqueeze(1)
    s = torch.cat([q @ kg.transpose(-1, -2),
                   (q.unsqueeze(-2) @ kw.transpose(-1, -2)).squeeze(-2).masked_fill(~inside, float("-inf"))], -1)
    a = F.dropout((s * (1.0 / math.sqrt(dh))).softmax(-1), dropout)
    return a[..., :r] @ vg + (a[..., r:].unsqueeze(-2) @ vw).squeeze(-2)


def long_short_cost(p: LongShortParams, env: OpEnv, s: Symbols) -> Cost:
    """The projections and W^P; P^T K and P^T V ([r, n] @ [n, dh] per K/V head); SDPA over nb segments of B
    queries against r + K keys, [b, h, nb, B, r + K] scores (the fused kernel; the math kernel with dropout)."""
    h, kv, dh = head_symbols(p, s)
    b, n, by, d = s.b, s.n, s.bytes, s.d
    W, R = s.sym("w", p.w), s.sym("r", p.r)
    e = sp.floor(W / 2)
    B = sp.Min(n, W)
    nb = sp.ceiling(n / B)
    several = sp.Min(1, sp.Max(0, n - W))  # 1 for several segments, 0 for one
    K = B + several * 2 * e
    L = (nb - 1) * B + K  # the window's keys, padded
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * d * by
    scores = b * h * nb * B * (R + K)
    qb = b * h * nb * B * dh * by  # the blocked queries, and the kernel's output
    kb = b * h * nb * (R + K) * dh * by  # the blocked keys (or values)
    pm = b * n * kv * R * by  # P
    bar = b * R * kv * dh * by  # P^T K (or V), and its LayerNorm
    mask = nb * B * (R + K) * by
    q_copy = sp.Min(1, (b - 1) + (nb * B - n))  # reshaping q to the (b*h, nb) batch: a copy, unless a view
    proj = linear(s, d, kv * R, p.bias) + Cost(params=4 * kv * dh, fwd=4 * b * kv * R * n * dh,
                                                bwd=8 * b * kv * R * n * dh)
    other = 5 * scores + 5 * b * n * kv * R + 14 * (b * n + b * R) * kv * dh
    if p.dropout > 0:
        core = Cost(fwd=4 * scores * dh, bwd=8 * scores * dh, fwd_other=other, bwd_other=2 * other)
        # the math kernel (float32): q scaled, k and v, the weights, their dropout mask and the dropped weights
        kernel_saved = (qb + 2 * kb + 3 * scores * by) * max(by, 4) / by
        # backward: o's gradient in the blocked layout, the dropped weights' and v's, o_proj's copy released
        bwd = [(qb + kb + scores * by) * max(by, 4) / by - q_copy * q]
    else:
        core = Cost(fwd=4 * scores * dh, bwd=10 * scores * dh, fwd_other=other, bwd_other=2 * other)
        kernel_saved = mask + qb + 2 * kb + qb + LSE_BYTES * b * h * nb * B
        bwd = [2 * qb + 2 * kb - q_copy * q]  # o's gradient and those of q, k, v; o_proj's copy released
    # kept: P and the copies P^T K reads (a view for one K/V head), the LayerNorms' inputs, means and rstds
    ln = 2 * (2 * b * n + 2 * b * R) * by + 2 * bar
    # P^T K reads K as [b * kv, n, dh]: a copy for several sequences of several K/V heads, else a view
    kcopy = 2 * kvb * sp.Min(1, b - 1) if (p.kv_heads or p.heads) > 1 else 0
    saved = pm + kcopy + 2 * kvb + ln + kernel_saved + q_copy * q  # o_proj's copy: where q was copied
    phases = [q + 2 * kvb + 2 * bar + mask + q_copy * qb + 2 * kb + qb + LSE_BYTES * b * h * nb * B,  # the kernel
              q + 2 * kvb + qb + q_copy * q + out,  # at o_proj
              q + 2 * kvb + 2 * bar + mask + 2 * kb + b * kv * L * dh * by]  # blocked values from a padded copy
    return attention_cost(p, s, h, kv, dh, proj + core, Cost(), saved, phases, cache=0, bwd_phases=bwd)


OP = register(Op(
    decode=None,  # bidirectional only: the projection reads every position
    family="mha", variant="long_short", params=LongShortParams, module=LongShortAttention,
    causal="no", shape=attention_shape, cost=long_short_cost,
    paper="Long-Short Transformer: Efficient Transformers for Language and Vision, Zhu et al. 2021, "
          "arXiv:2107.02192",
    summary="one softmax over a segment-wise window (segment w, w // 2 keys either side) and r keys/values "
            "P^T K, P^T V, P = softmax over positions of X W^P; DualLN; O(n (w + r) d)",
    note="MHA/SparseOrLowRank/009.md",
))
