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

from typing import Callable

import torch
import torch.nn.functional as F

MIN_BLOCK = 32  # smallest query block: below it, per-block overhead outweighs the wasted out-of-band scores

Bias = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def band_blocks(n: int, lo: int, hi: int, block: int | None = None):
    """Block layout for a band (lo back, hi ahead) over n positions: (lo, hi, B, nb, left, K), where lo and
    hi are clipped to n - 1, B is the query block, nb the number of blocks, left the zero keys padded before
    position 0 and K the keys each block sees. A single block (n <= B) sees exactly the n keys."""
    lo, hi = min(lo, n - 1), min(hi, n - 1)
    B = min(n, block or max(lo, hi, MIN_BLOCK))
    nb = -(-n // B)
    if nb == 1:
        return lo, hi, B, 1, 0, n
    return lo, hi, B, nb, lo, B + lo + hi


def banded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: int, hi: int,
                     bias: Bias | None = None, dropout: float = 0.0, block: int | None = None) -> torch.Tensor:
    """q, k, v [b, h, n, dh] -> [b, h, n, dh]: query t attends keys t-lo .. t+hi (clipped to 0 .. n-1).

    `bias(i, j)` gets absolute query positions i [nb, B, 1] and key positions j [nb, 1, K] (int64; keys of
    the padding lie outside 0 .. n-1 and are masked whatever the bias says) and returns an additive score
    bias broadcastable to [h, nb, B, K], with -inf allowed, or None. Every query keeps its own key (t - r = 0)
    in the band, so it must give that key a finite bias."""
    b, h, n, dh = q.shape
    lo, hi, B, nb, left, K = band_blocks(n, lo, hi, block)
    right = (nb - 1) * B + K - left - n
    dev = q.device
    i = torch.arange(nb * B, device=dev).view(nb, B, 1)
    j = (torch.arange(nb, device=dev) * B - left).view(nb, 1, 1) + torch.arange(K, device=dev).view(1, 1, K)
    dist = i - j  # t - r
    allowed = (dist <= lo) & (dist >= -hi) & (j >= 0) & (j < n)
    extra = None if bias is None else bias(i, j)
    mask = torch.zeros((), dtype=q.dtype, device=dev) if extra is None else extra.to(q.dtype)
    mask = torch.where(allowed, mask, float("-inf"))
    mask = torch.where(i >= n, 0.0, mask)  # padded queries: any finite row; their outputs are cut
    if mask.dim() == 3:
        mask = mask.unsqueeze(0)  # [H, nb, B, K], H = h or 1

    qb = F.pad(q, (0, 0, 0, nb * B - n)).view(b, h, nb, B, dh)
    kb = F.pad(k, (0, 0, left, right)).unfold(2, K, B).transpose(-1, -2)  # [b, h, nb, K, dh], a view
    vb = F.pad(v, (0, 0, left, right)).unfold(2, K, B).transpose(-1, -2)
    if mask.shape[0] == 1:  # one band for all heads: batch dims (b*h, nb), the mask broadcasts uncopied
        lead, mask = (b * h, nb), mask
    else:  # a per-head bias: batch dims (b, h*nb)
        lead, mask = (b, h * nb), mask.expand(h, nb, B, K).reshape(1, h * nb, B, K)
    o = F.scaled_dot_product_attention(qb.reshape(*lead, B, dh), kb.reshape(*lead, K, dh),
                                       vb.reshape(*lead, K, dh), attn_mask=mask, dropout_p=dropout)
    return o.view(b, h, nb * B, dh)[:, :, :n]
