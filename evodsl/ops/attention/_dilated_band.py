"""Longformer's windowed attention (mha(longformer)): a dilated band with global keys, in O(n (w + g)).

Query t attends the keys r = t + d j (lo >= -j >= -hi, d the dilation) of its window, and, with g > 0, the g
global keys 0 .. g-1 jointly in one softmax; a global position never also counts inside a window (no
duplicates, as HF's LongformerSelfAttention). The queries of the global positions themselves are computed
here too (from the regular projections) and overwritten by the caller.

A residue class mod d is a band of stride 1 on its subsequence, so the sequence is read as M = ceil(n / d)
rows of d (zero-padded at the end): sub-position u, residue c is position u d + c. Blocks of B sub-positions
(band_blocks on M) attend K = B + lo + hi sub-positions of the same residue, a strided view (unfold) of K and V
padded with lo d zero positions on the left; the g global keys are put before each block's window (one copy,
[b, h, nb, d, g + K, dh]), and one F.scaled_dot_product_attention call reads all nb d blocks. Keys outside the
window, the sequence, or at a global position (for a query that is not global) get -inf; a padded query row
(beyond n) is computed against a finite row and cut. With d = 1 and g = 0 this is _banded._blocked_band's
layout; that case runs there (banded_attention).

`side` (d = 1 only; ETC's relative position labels and hard l2g, etc.py) adds to each score the query's
relative score R[t, id] of the key's label (window keys: a label per offset; global keys: a label per query and
global) and may take global keys away from a query (`global_keep`); both layouts gather them from [n, ...]
tables, so no n x n tensor is made.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._banded import band_blocks


@dataclass
class Side:
    """Per-query extras of the band (d = 1): `scores` [b, h, n, V] (already scaled) with `window_ids` [lo + hi + 1]
    (the label of offset -lo .. hi) and `global_ids` [n, g] (the label of each global key), so that score(t, key)
    += scores[t, label]; `global_keep` bool [n, g]: the global keys query t may read (None: all)."""
    scores: torch.Tensor | None = None
    window_ids: torch.Tensor | None = None
    global_ids: torch.Tensor | None = None
    global_keep: torch.Tensor | None = None


def _rows(t: torch.Tensor, rows: int, value) -> torch.Tensor:
    """t [n, ...] padded at the end to `rows` rows with `value`."""
    return F.pad(t, (0, 0) * (t.dim() - 1) + (0, rows - t.shape[0]), value=value) if rows > t.shape[0] else t


def dilated_layout(n: int, d: int, lo: int, hi: int):
    """(M, lo, hi, B, nb, left, K, L): sub-length M = ceil(n / d), the band_blocks layout on it (lo, hi
    clipped), and L, the padded sub-length (nb - 1) B + K the key views are cut from."""
    M = -(-n // d)
    lo, hi, B, nb, left, K = band_blocks(M, lo, hi)
    return M, lo, hi, B, nb, left, K, (nb - 1) * B + K


def _window_mask(n, d, g, lo, hi, B, nb, left, K, dtype, device) -> torch.Tensor:
    """The additive mask [nb, d, B, g + K]: the global columns 0, the window columns 0 in the band (within the
    sequence, a global position only for a global query) and -inf elsewhere; padded queries (beyond n) read
    a finite row."""
    blk = torch.arange(nb, device=device).view(nb, 1, 1, 1) * B
    c = torch.arange(d, device=device).view(1, d, 1, 1)
    u = blk + torch.arange(B, device=device).view(1, 1, B, 1)  # query sub-positions
    r = blk - left + torch.arange(K, device=device).view(1, 1, 1, K)  # key sub-positions
    ti, tj = u * d + c, r * d + c  # positions
    allowed = (u - r <= lo) & (r - u <= hi) & (r >= 0) & (tj < n)
    if g:
        allowed = allowed & ((tj >= g) | (ti < g))
    allowed = allowed | (ti >= n)  # padded queries: any finite row; their outputs are cut
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    if g:
        mask = torch.cat((mask.new_zeros(nb, d, B, g), mask), -1)
    return mask


def dilated_band(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: int, hi: int, d: int, g: int,
                 dropout: float = 0.0, key_mask: torch.Tensor | None = None, side: Side | None = None) -> torch.Tensor:
    """q, k, v [b, h, n, dh] (k, v with h heads) -> the attention output laid out for o_proj, [b, n, h dh].
    Query t reads keys t - d lo .. t + d hi in steps of d and the global keys 0 .. g-1 (g <= n); `key_mask`
    (bool [b, n], False = padding) takes padded keys out of both. A query left with no key reads its own.
    `side`: relative scores and hard global keys (Side; d = 1)."""
    b, h, n, dh = q.shape
    if not isinstance(n, int) or torch.jit.is_tracing():
        return gathered_dilated_band(q, k, v, lo, hi, d, g, dropout, key_mask, side)
    lo0, hi0 = lo, hi  # the offsets the window labels are given for (dilated_layout clips lo, hi)
    M, lo, hi, B, nb, left, K, L = dilated_layout(n, d, lo, hi)
    mask = _window_mask(n, d, g, lo, hi, B, nb, left, K, q.dtype, q.device)  # [nb, d, B, g + K]
    if side is not None and side.global_keep is not None:  # hard global keys: the others -inf
        drop = ~_rows(side.global_keep, nb * B, True).view(nb, 1, B, g)
        mask[..., :g] = mask[..., :g].masked_fill(drop, float("-inf"))
    pad_l, pad_r = left * d, L * d - left * d - n
    qb = (F.pad(q, (0, 0, 0, nb * B * d - n)) if nb * B * d > n else q).view(b, h, nb, B, d, dh).transpose(3, 4)
    kb, vb = ((F.pad(t, (0, 0, pad_l, pad_r)) if pad_l or pad_r else t).view(b, h, L, d, dh).unfold(2, K, B)
              .transpose(-1, -2) for t in (k, v))  # [b, h, nb, d, K, dh], views
    if g:  # the global keys before each window: [b, h, nb, d, g + K, dh]
        kb, vb = (torch.cat((t[:, :, None, None, :g].expand(b, h, nb, d, g, dh), w), -2)
                  for t, w in ((k, kb), (v, vb)))
    if key_mask is not None:  # per sequence: [b, nb, d, B, g + K] -> [b h, nb d, B, g + K]
        keep = F.pad(key_mask, (pad_l, pad_r), value=False).view(b, L, d).unfold(1, K, B)  # [b, nb, d, K]
        if g:
            keep = torch.cat((key_mask[:, None, None, :g].expand(b, nb, d, g), keep), -1)
        keep = keep[:, :, :, None, :] & torch.isfinite(mask)
        own = torch.arange(B, device=q.device)[:, None] + g + left == torch.arange(g + K, device=q.device)
        keep = keep | (own & ~keep.any(-1, keepdim=True))
        mask = torch.where(keep, mask, float("-inf"))
        del keep
        mask = mask[:, None].expand(b, h, nb, d, B, g + K).reshape(b * h, nb * d, B, g + K)
    else:
        mask = mask.view(1, nb * d, B, g + K)
    if side is not None and side.scores is not None:  # + scores[t, label], gathered per block: [b h, nb, B, g + K]
        offset = torch.arange(K, device=q.device)[None, :] - torch.arange(B, device=q.device)[:, None] - left
        ids = side.window_ids[offset.add_(lo0).clamp_(0, lo0 + hi0)].expand(nb, B, K)  # key - query offsets
        del offset
        if g:
            ids = torch.cat((_rows(side.global_ids, nb * B, 0).view(nb, B, g), ids), -1)
        rel = side.scores  # [b, h, n, V], any strides: padded to nb B rows (a copy), else read in place
        rel = (F.pad(rel, (0, 0, 0, nb * B - n)) if nb * B > n else rel).unflatten(2, (nb, B))
        rel = rel.gather(-1, ids.expand(b, h, nb, B, g + K)).view(b * h, nb, B, g + K)
        mask = rel.add_(mask)  # the gathered scores are the mask now (gather's backward needs no output)
        del rel, ids
    o = F.scaled_dot_product_attention(qb.reshape(b * h, nb * d, B, dh), kb.reshape(b * h, nb * d, g + K, dh),
                                       vb.reshape(b * h, nb * d, g + K, dh), attn_mask=mask, dropout_p=dropout)
    # [b h, nb d, B, dh] -> [b, nb, B, d, h, dh]: position (blk B + u) d + c, heads last
    return o.reshape(b, h, nb, d, B, dh).permute(0, 2, 4, 3, 1, 5).reshape(b, nb * B * d, h * dh)[:, :n]


def gathered_dilated_band(q, k, v, lo: int, hi: int, d: int, g: int, dropout: float,
                          key_mask: torch.Tensor | None = None, side: Side | None = None) -> torch.Tensor:
    """The same attention for a symbolic n (export): each query gathers its W = lo + hi + 1 window keys and
    the g global keys, [b, h, n, g + W, dh] scores by explicit matmuls, O(n (w + g)), shapes that only scale
    n. Returns [b, n, h dh]."""
    b, h, n, dh = q.shape
    scale = 1.0 / math.sqrt(dh)
    i = torch.arange(n, device=q.device).unsqueeze(1)  # [n, 1]
    j = i + d * torch.arange(-lo, hi + 1, device=q.device)  # [n, W] key positions
    inside = (j >= 0) & (j < n)
    if g:
        inside = inside & ((j >= g) | (i < g))
    jc = j.clamp(0, n - 1)
    kw, vw = k[:, :, jc], v[:, :, jc]  # [b, h, n, W, dh]
    s = (q.unsqueeze(-2) @ kw.transpose(-1, -2)).squeeze(-2) * scale  # [b, h, n, W]
    if key_mask is not None:
        inside = inside & key_mask[:, jc].unsqueeze(1)  # [b, 1, n, W]
    if g:
        s = torch.cat(((q @ k[:, :, :g].transpose(-1, -2)) * scale, s), -1)  # [b, h, n, g + W]
        keep_g = torch.ones(g, dtype=torch.bool, device=q.device) if key_mask is None else key_mask[:, None, None, :g]
        if side is not None and side.global_keep is not None:
            keep_g = keep_g & side.global_keep
        inside = torch.cat((keep_g.expand(*inside.shape[:-1], g), inside), -1)
    if side is not None and side.scores is not None:  # + scores[t, label]
        ids = side.window_ids[None, :].expand(n, lo + hi + 1)
        if g:
            ids = torch.cat((side.global_ids, ids), -1)
        s = s + side.scores.gather(-1, ids.expand(b, h, n, ids.shape[-1]))
    own = torch.arange(g + lo + hi + 1, device=q.device) == g + lo  # a query with no key left reads its own
    inside = inside | (own & ~inside.any(-1, keepdim=True))
    p = F.dropout(s.masked_fill(~inside, float("-inf")).softmax(-1), dropout)
    o = (p[..., g:].unsqueeze(-2) @ vw).squeeze(-2)
    if g:
        o = o + p[..., :g] @ v[:, :, :g]
    return o.transpose(1, 2).reshape(b, n, h * dh)
