"""Banded (sliding-window) softmax attention in O(n * w) time and memory, shared by mha(local) and
mha(adaptive_span).

Query t attends the keys r with -hi <= t - r <= lo (causal: hi = 0), with scores

    s_tr = q_t . k_r / sqrt(dh) + bias(t, r),    o_t = sum_r softmax_r(s_tr) v_r   (r in the band).

No n x n tensor is built. "Sliding chunks": the queries are cut into blocks of B positions (B ~ the band
width); block c (queries cB .. cB+B-1) attends the K = B + lo + hi contiguous keys cB-lo .. cB+B-1+hi, taken
as a strided view (unfold) of K and V padded with lo zeros on the left and enough on the right. Keys outside
the band or the sequence get -inf, and one F.scaled_dot_product_attention call does every block at once
(its fused CPU/GPU kernel; it falls back to the math kernel, which gives the mask its gradient, when the
bias needs one). Padded query rows (n not a multiple of B) are computed against a zero mask and cut.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import sympy as sp
import torch
import torch.nn.functional as F

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import (LSE_BYTES, AttentionParams, attention_cost, head_symbols, position_cost, rotates,
                      score_bias)

MIN_BLOCK = 32  # the smallest query block

Bias = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def band_block(lo: int, hi: int) -> int:
    """Queries per block: 64 (128 for bands of a thousand keys and more; the band itself when narrower than
    32). Measured on CPU (d 256, 4 heads, n 4096): a block of 64 ran 1.3 to 1.6x faster than one of 128 or 256
    at w 128..512, one of 128 was the fastest at w 2048."""
    return max(MIN_BLOCK, min(max(lo, hi), 128 if max(lo, hi) >= 1024 else 64))


def _block_mask(B: int, K: int, lo: int, hi: int, bias: Bias | None, dtype, device) -> torch.Tensor:
    """The band seen by a block of B queries against its K = B + lo + hi keys (query i at t = lo + i, key c at
    r = c): bool [B, K] without a bias, else the additive [1, H, B, K] (the bias in the band, -inf outside).
    The band and the bias depend on t - r only, so one mask serves every block, cut at the sequence's ends."""
    i = torch.arange(lo, lo + B, device=device)[:, None]
    j = torch.arange(K, device=device)[None, :]
    dist = i - j
    allowed = (dist <= lo) & (dist >= -hi)
    del dist
    extra = None if bias is None else bias(i, j)
    if extra is None:
        return allowed
    mask = torch.where(allowed, extra.to(dtype), float("-inf"))
    return mask.reshape(1, -1, B, K)  # 4-D: the fused kernel takes it (a 3-D mask sends SDPA to its math kernel)


def _prefix_mask(P: int, bias: Bias, causal: bool, dtype, device) -> torch.Tensor:
    """The [1, H, P, P] mask of P queries against all P keys with a bias: the bias where a query may look
    (causal: on and below the diagonal; else everywhere), -inf elsewhere."""
    i, j = torch.arange(P, device=device)[:, None], torch.arange(P, device=device)[None, :]
    extra = bias(i, j)
    extra = torch.zeros((), dtype=dtype, device=device) if extra is None else extra.to(dtype)
    mask = torch.where(j <= i, extra, float("-inf")) if causal else extra.expand(*extra.shape[:-2], P, P)
    return mask.reshape(1, -1, P, P)


def _padded(mask: torch.Tensor, keep: torch.Tensor, own: int | None) -> torch.Tensor:
    """mask (bool [Bq, Kc], or additive [H, Bq, Kc]) with the padded keys of each sequence out: [b, H, Bq, Kc].
    keep: bool [b, Kc] (True = a token). A query left with no key reads key i + own (its own position; own
    None: the causal prefix, where it is key i), so that every row is finite."""
    Bq, Kc = mask.shape[-2:]
    ok = mask if mask.dtype == torch.bool else torch.isfinite(mask)
    ok = ok & keep[:, None, None, :]  # [b, H | 1, Bq, Kc]
    idx = torch.arange(Bq, device=mask.device)[:, None] + (own or 0)
    ok = ok | ((idx == torch.arange(Kc, device=mask.device)) & ~ok.any(-1, keepdim=True))
    return ok if mask.dtype == torch.bool else torch.where(ok, mask, float("-inf"))


def banded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: int, hi: int,
                     bias: Bias | None = None, dropout: float = 0.0, block: int | None = None,
                     key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v [b, h, n, dh] -> [b, h, n, dh]: query t attends keys t-lo .. t+hi (clipped to 0 .. n-1).

    `bias(i, j)` gets absolute query positions i and key positions j (int64, broadcasting) and returns an
    additive score bias broadcastable to [h, *i - j], -inf allowed, or None; it depends on i - j only (ALiBi, the
    adaptive-span ramp) and gives a query's own key a finite value. `key_mask` (bool [b, n], False = padding)
    takes the padded keys out of every band.

    Forms: a band as wide as the sequence is one SDPA call (causal, or over every key). Narrower, it runs _causal_band
    at inference (without autograd: a causal SDPA prefix, then blocks of queries, peak no larger than SDPA's) and
    _blocked_band under autograd (all blocks in one SDPA call, whose backward holds O(n w) bytes; per-block calls
    would each leave a full-size gradient of q, k and v). Bidirectional bands run _blocked_band."""
    b, h, n, dh = q.shape
    if not isinstance(n, int) or torch.jit.is_tracing():
        return _gathered_band(q, k, v, lo, hi, bias, dropout, key_mask)
    lo, hi = min(lo, n - 1), min(hi, n - 1)
    if lo == hi == n - 1:  # every query reads every key
        return _one_call(q, k, v, n, bias, dropout, key_mask, causal=False)
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if hi == 0 and (lo == n - 1 or not recording):
        return _causal_band(q, k, v, lo, bias, dropout, block, key_mask)
    return _blocked_band(q, k, v, lo, hi, bias, dropout, block, key_mask)


def _one_call(q, k, v, P: int, bias, dropout: float, key_mask, causal: bool) -> torch.Tensor:
    """The first P queries against the first P keys in one SDPA call: causal (is_causal without a bias or
    padding), or every key; a bias or padding goes in as a [1 | b, H, P, P] mask."""
    mask = None if bias is None else _prefix_mask(P, bias, causal, q.dtype, q.device)
    if key_mask is not None:
        base = mask if mask is not None else torch.ones(P, P, dtype=torch.bool, device=q.device)
        mask = _padded(base.tril_() if mask is None and causal else base, key_mask[:, :P], None)
    return F.scaled_dot_product_attention(q[:, :, :P], k[:, :, :P], v[:, :, :P], attn_mask=mask, dropout_p=dropout,
                                          is_causal=causal and mask is None and P > 1)


def _causal_band(q, k, v, lo: int, bias, dropout: float, block, key_mask) -> torch.Tensor:
    """Causal: queries 0 .. lo read every key back to position 0, so they are one causal SDPA call on the
    prefix (P = lo + 1 queries; the whole sequence when w >= n: plain causal SDPA). The later queries go in
    blocks of B (band_block) against their K = B + lo keys, t - lo - (B - 1) .. t, with the block mask shared by
    all blocks (bool without a bias). Scores: P^2 + (n - P)(B + lo) at most, never more than causal SDPA's
    n^2 for any w <= n (whose fused kernel also skips only whole masked tiles).
    One SDPA call per block on slices of q, k, v (views), each written into one result laid out as q's
    projection [b, n, h, dh] (o_proj reads it uncopied): no tensor larger than q but the prefix's. Without
    autograd only (banded_attention), but for P = n (one call)."""
    b, h, n, dh = q.shape
    sdpa = F.scaled_dot_product_attention
    P = min(n, lo + 1)
    head = _one_call(q, k, v, P, bias, dropout, key_mask, causal=True)
    if P == n:
        return head
    B = block or band_block(lo, 0)
    K = B + lo
    band = _block_mask(B, K, lo, 0, bias, q.dtype, q.device)
    if band.dtype == torch.bool:  # additive once: SDPA would turn a bool mask into this at every block's call
        # (a contiguous call measured 14% slower with the bool mask; bench_band's ratio at w = 3n/4 did not move)
        band = torch.zeros(band.shape, dtype=q.dtype, device=q.device).masked_fill_(~band, float("-inf"))
    o = q.new_empty(b, n, h, dh).transpose(1, 2)
    o[:, :, :P] = head
    del head
    for s in range(P, n, B):
        e = min(s + B, n)
        mask = band[..., :e - s, :e - s + lo]
        if key_mask is not None:
            mask = _padded(mask, key_mask[:, s - lo:e], lo)
        o[:, :, s:e] = sdpa(q[:, :, s:e], k[:, :, s - lo:e], v[:, :, s - lo:e], attn_mask=mask, dropout_p=dropout)
        del mask
    return o


def band_blocks(n: int, lo: int, hi: int, block: int | None = None, wide: bool = False):
    """Block layout for a band (lo back, hi ahead) over n positions: (lo, hi, B, nb, left, K), where lo and
    hi are clipped to n - 1, B is the query block, nb the number of blocks, left the zero keys padded before
    position 0 and K the keys each block sees. A single block (n <= B; with `wide` and the default block also
    wherever the blocks would score more than n x n: a wide band) is every query against exactly the n keys, the
    band its mask."""
    lo, hi = min(lo, n - 1), min(hi, n - 1)
    B = min(n, block or max(lo, hi, MIN_BLOCK))
    nb = -(-n // B)
    if nb == 1 or (wide and block is None and nb * B * (B + lo + hi) >= n * n):  # blocks would score more:
        return lo, hi, n, 1, 0, n  # one block of every query against every key, the band as its mask
    return lo, hi, B, nb, lo, B + lo + hi


def _band_mask(n: int, lo: int, hi: int, B: int, nb: int, left: int, K: int, bias: Bias | None, dtype,
               device) -> torch.Tensor:
    """The additive mask [H, nb, B, K] (H = h, or 1 without a per-head bias): 0 or bias in the band, -inf
    outside it. Its int64 position and distance tensors die on return, before attention runs."""
    i = torch.arange(nb * B, device=device).view(nb, B, 1)
    j = (torch.arange(nb, device=device) * B - left).view(nb, 1, 1) + torch.arange(K, device=device).view(1, 1, K)
    dist = i - j  # t - r
    allowed = (dist <= lo) & (dist >= -hi) & (j >= 0) & (j < n)
    del dist
    extra = None if bias is None else bias(i, j)
    extra = torch.zeros((), dtype=dtype, device=device) if extra is None else extra.to(dtype)
    mask = torch.where(allowed, extra, float("-inf"))
    del extra
    mask.masked_fill_(i >= n, 0.0)  # padded queries: any finite row; their outputs are cut
    return mask if mask.dim() == 4 else mask.unsqueeze(0)


def _without_padded_keys(mask, key_mask, n: int, B: int, nb: int, left: int, K: int):
    """The band mask [H, nb, B, K] with the padded keys of each sequence at -inf: [b, H, nb, B, K]. A query
    left with no key (a padded position) reads its own, so that every row is finite."""
    right = (nb - 1) * B + K - left - n
    keep = F.pad(key_mask, (left, right), value=False).unfold(1, K, B)[:, None, :, None, :]  # [b, 1, nb, 1, K]
    own = torch.arange(B, device=mask.device)[:, None] + left == torch.arange(K, device=mask.device)  # [B, K]:
    # query t of a block reads key t + left of its window, in every block
    keep = keep & torch.isfinite(mask)
    keep = keep | (own & ~keep.any(-1, keepdim=True))
    return torch.where(keep, mask, float("-inf"))


def _blocked_band(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: int, hi: int,
                     bias: Bias | None = None, dropout: float = 0.0, block: int | None = None,
                     key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The bidirectional band (hi > 0), in one SDPA call over blocks: query t attends keys t-lo .. t+hi.

    `bias(i, j)` gets absolute query positions i [nb, B, 1] and key positions j [nb, 1, K] (int64; keys of
    the padding lie outside 0 .. n-1 and are masked whatever the bias says) and returns an additive score
    bias broadcastable to [h, nb, B, K], with -inf allowed, or None. Every query keeps its own key (t - r = 0)
    in the band, so it must give that key a finite bias. `key_mask` (bool [b, n], False = padding) takes the
    padded keys out of every band."""
    b, h, n, dh = q.shape
    if not isinstance(n, int) or torch.jit.is_tracing():
        return _gathered_band(q, k, v, lo, hi, bias, dropout, key_mask)
    # a wide band without a bias: one block, every key, the band as a bool mask (the memory of the one-block
    # form with a per-head bias is not modelled yet)
    lo, hi, B, nb, left, K = band_blocks(n, lo, hi, block, wide=bias is None)
    right = (nb - 1) * B + K - left - n
    mask = _band_mask(n, lo, hi, B, nb, left, K, bias, q.dtype, q.device)  # [H, nb, B, K], H = h or 1

    # Pad only where needed: a zero pad would copy q (keeping its [b, n, h, dh] layout) before the reshape
    # below copies it again.
    qb = (F.pad(q, (0, 0, 0, nb * B - n)) if nb * B > n else q).view(b, h, nb, B, dh)
    kb, vb = ((F.pad(t, (0, 0, left, right)) if left or right else t).unfold(2, K, B).transpose(-1, -2)
              for t in (k, v))  # [b, h, nb, K, dh], views of the padded keys
    if key_mask is not None:  # per sequence: [b, H, nb, B, K]
        mask = _without_padded_keys(mask, key_mask, n, B, nb, left, K)
        lead = (b * h, nb) if mask.shape[1] == 1 else (b, h * nb)
        mask = mask.expand(b, h, nb, B, K).reshape(*lead, B, K)
    elif mask.shape[0] == 1:  # one band for all heads: batch dims (b*h, nb), the mask broadcasts uncopied
        lead = (b * h, nb)
    else:  # a per-head bias: batch dims (b, h*nb)
        lead, mask = (b, h * nb), mask.expand(h, nb, B, K).reshape(1, h * nb, B, K)
    o = F.scaled_dot_product_attention(qb.reshape(*lead, B, dh), kb.reshape(*lead, K, dh),
                                       vb.reshape(*lead, K, dh), attn_mask=mask, dropout_p=dropout)
    # reshape, not view: CUDA's SDPA kernels return their output with the head dim inside the query dim's
    # stride, which no view can merge (a copy there; the CPU's output is contiguous, and this is a view)
    return o.reshape(b, h, nb * B, dh)[:, :, :n]


# -------------------------------------------------------------------- cost


def band_layout(n, lo, hi, wide: bool = False):
    """band_blocks (default block) as formulas in n: (B, nb, K, L), L the padded key length. lo and hi are
    formulas for the band before clipping (w - 1, S - 1, or 0 for hi)."""
    lo, hi = sp.Min(lo, n - 1), (sp.Min(hi, n - 1) if hi != 0 else 0)
    B = sp.Min(n, sp.Max(lo, MIN_BLOCK))
    nb = sp.ceiling(n / B)
    several = sp.Min(1, sp.Max(0, n - MIN_BLOCK))  # 1 for several blocks (n > MIN_BLOCK), 0 for one
    K = B + several * (lo + hi)
    if wide:  # where blocks would score more than n x n: one block of n queries
        one = nb * B * (B + lo + hi) >= n ** 2
        B, nb, K = (sp.Piecewise((n, one), (B, True)), sp.Piecewise((1, one), (nb, True)),
                    sp.Piecewise((n, one), (K, True)))
    return B, nb, K, (nb - 1) * B + K


@dataclass(frozen=True)
class BandBias:
    """A per-head score bias evaluated on the band ([h, nb, B, K], I = nb*B*K elements per head), as formulas
    in h, I and `by` (bytes per element of the model dtype): its forward FLOPs, the bytes it keeps for
    backward, the bytes alive at its construction over q, k, v, and whether it needs a gradient (then SDPA
    runs its math kernel in training: the [b, h, nb, B, K] weights are kept, backward counts 2x)."""

    other: Callable  # (h, I) -> FLOPs
    saved: Callable  # (h, I, by) -> bytes
    peak: Callable  # (h, I, by) -> bytes, the band's own bool mask and int64 distances included
    grad: bool = False
    masked_copy: bool = False  # peak counts an [h, I] copy masked to the band, which one call over every key skips

    def plus_position(self) -> "BandBias":
        """This bias with a position scheme's added (adaptive span with ALiBi): its FLOPs, and at the sum its
        [h, ...] bias and int64 |i - j| besides."""
        return BandBias(other=lambda h, I: self.other(h, I) + POSITION_BIAS.other(h, I), saved=self.saved,
                        peak=lambda h, I, by: self.peak(h, I, by) + h * I * by + 8 * I, grad=self.grad)


# ALiBi (or any position scheme's bias) on the band: int64 distances and their absolute value, the [h, ...]
# product, then the masked copy beside it.
POSITION_BIAS = BandBias(other=lambda h, I: (2 + h) * I, saved=lambda h, I, by: 0,
                         peak=lambda h, I, by: sp.Max(17 * I, 2 * h * I * by + I), masked_copy=True)


def banded_attention_cost(p: AttentionParams, env: OpEnv, s: Symbols, lo, hi, bias: BandBias | None = None,
                          cache_keys=None) -> Cost:
    """The cost of an attention variant that runs banded_attention(q, k, v, lo, hi, bias) after the shared
    projections: _blocked_band, whose kernel reads the nb blocks of B queries against K keys each,
    [b, h, nb, B, K] scores; a causal band (hi = 0) and a band as wide as the sequence run other forms
    (_band_cost.py)."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    bias0 = bias
    if score_bias(env):  # the position scheme's bias on the band, alone or added to the variant's own
        bias = POSITION_BIAS if bias is None else bias.plus_position()
    B, nb, K, L = band_layout(n, lo, hi, wide=bias is None)
    pos = Cost() if score_bias(env) else position_cost(env, s, h, kv, dh)  # a bias is counted on the band
    I = nb * B * K  # band elements per head
    scores = b * h * I
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    qkv, grouped = q + 2 * kvb, (2 * q if kv != h else 0)  # k, v repeated to h heads
    qb = b * h * nb * B * dh * by  # the blocked queries, and the kernel's output
    mask = (h if bias else 1) * I * by
    several = sp.Min(1, nb - 1)
    # Layouts decide the copies. q and k come as views of the projections' [b, n, h, dh] outputs, or
    # contiguous [b, h, n, dh] (rotated; repeated for grouped K/V heads). The blocked batch dims are (b*h, nb),
    # or (b, h*nb) with a per-head bias, and SDPA's output takes q's layout.
    viewed = not rotates(env) and kv == h  # k in the projection's layout
    keys = 2 * b * h * L * dh * by  # k and v, zero-padded to L when the band needs it: the kernel reads views
    keys_new = sp.Min(1, (L - n) + ((b - 1) if viewed else 0))  # is that storage new (padded or copied)?
    copies = 2 * b * h * nb * K * dh * by * several if bias else 0  # the (b, h*nb) layout copies the views
    padded = sp.Min(1, nb * B - n)
    if rotates(env):
        q_copy, o_copy = padded, 1
    elif bias:
        q_copy = o_copy = several
    else:
        q_copy = o_copy = sp.Min(1, (b - 1) + (nb * B - n))
    kept_keys = copies + (keys * (1 - several) if bias else keys)

    other = 5 * scores + 8 * I + (bias.other(h, I) if bias else 0)  # softmax; mask: distances, tests, where
    grad = bias is not None and bias.grad
    if grad or p.dropout > 0:  # training runs SDPA's math kernel (in float32 for 16-bit dtypes): when the mask
        # needs a gradient, or with dropout (which the fused CPU kernel lacks)
        core = Cost(fwd=4 * scores * dh, bwd=8 * scores * dh, fwd_other=other, bwd_other=2 * other)
        weights = 3 if p.dropout > 0 else 1  # the weights; with dropout its float mask and the dropped weights
        saved = ((b * h * nb * (B + 2 * K) * dh + weights * scores) * max(by, 4) + q  # q, k scaled; v; o_proj's
                 + (bias.saved(h, I, by) + I + nb * B if grad else 0))  # the bias's own; band, padding masks
    else:
        core = Cost(fwd=4 * scores * dh, bwd=10 * scores * dh, fwd_other=other, bwd_other=2 * other)
        saved = mask + qb + kept_keys + qb + LSE_BYTES * b * h * nb * B + o_copy * q
    # backward: o's gradient laid out as the blocked queries (a copy, or padded), o_proj's copy released; the
    # fused kernel gives the gradients of the blocked q, k and v. The math kernel (float32) gives v's and the
    # weights', then (v and the copy released) the scores' (softmax) beside the weights' (with dropout the
    # dropped weights are released first)
    Gq, Gk = b * h * nb * B * dh * by, b * h * nb * K * dh * by
    if grad or p.dropout > 0:
        W, Gq, Gk = scores * max(by, 4), Gq * max(by, 4) / by, Gk * max(by, 4) / by
        bwd = [Gq + Gk + W - o_copy * q, (1 if p.dropout > 0 else 2) * W - o_copy * q]
    else:
        bwd = [2 * Gq + 2 * Gk - o_copy * q]
    phases = [qkv + grouped + (bias.peak(h, I, by) if bias else 11 * I),  # building the mask
              qkv + grouped + mask + q_copy * qb + keys_new * keys + copies + qb + LSE_BYTES * b * h * nb * B,
              qkv + qb + o_copy * q + out]  # at o_proj
    if env.pos is not None:
        phases.append(qkv + pos.peak)
    cache = 2 * b * sp.Min(n, cache_keys) * kv * dh * by
    cost = attention_cost(p, s, h, kv, dh, core, pos, saved + pos.saved, phases, cache, bwd_phases=bwd)
    from ._band_cost import causal_band_cost, one_call_cost, with_one_call

    if hi == 0:  # the forms a causal band runs in (banded_attention)
        return causal_band_cost(p, env, s, lo, bias0, cache, cost)
    return with_one_call(cost, one_call_cost(p, env, s, bias, cache, causal=False), n, lo, hi)


def _gathered_band(q, k, v, lo: int, hi: int, bias: Bias | None, dropout: float,
                   key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The same attention for a symbolic n (torch.export, ONNX export with a dynamic sequence axis): each query
    gathers its own W = lo + hi + 1 keys, [b, h, n, W, dh], still O(n * w) and never n x n, with shapes that
    only scale n (the blocked layout's reshapes would tie the exported graph to one n)."""
    n, dh = q.shape[2], q.shape[3]
    i = torch.arange(n, device=q.device).unsqueeze(1)  # [n, 1]
    j = i + torch.arange(-lo, hi + 1, device=q.device)  # [n, W] key positions
    inside = (j >= 0) & (j < n)
    jc = j.clamp(0, n - 1)
    kg, vg = k[:, :, jc], v[:, :, jc]  # [b, h, n, W, dh]
    s = (q.unsqueeze(-2) @ kg.transpose(-1, -2)).squeeze(-2) * (1.0 / math.sqrt(dh))  # [b, h, n, W]
    extra = None if bias is None else bias(i, j)
    if extra is not None:
        s = s + extra.to(s.dtype)
    if key_mask is not None:  # [b, 1 | h, n, W]; a query with no key left (padded, or weighed 0 by the bias: an
        inside = inside & key_mask[:, jc].unsqueeze(1)  # adaptive span's padded query) reads its own (column lo)
        if extra is not None:
            inside = inside & torch.isfinite(extra)
        own = torch.arange(lo + hi + 1, device=q.device) == lo
        inside = inside | (own & ~inside.any(-1, keepdim=True))
    p = F.dropout(s.masked_fill(~inside, float("-inf")).softmax(-1), dropout)
    return (p.unsqueeze(-2) @ vg).squeeze(-2)
