"""The compression and selection branches of mha(nsa) (nsa.py), over queries at positions t and keys 0 .. N-1.

Shared by the forward (t = 0 .. n-1), the decoding steps (t = offset ..) and the export (a symbolic N: the block
counts are then upper bounds, the blocks past the sequence masked, no Python branch on N's value)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class BlockCompressor(nn.Module):
    """phi: a block of l keys (or values) of one K/V head -> one vector: W2 relu(W1 vec(k_block + P) + b1) + b2,
    P [l, dh] the learned intra-block position encoding, W1 [dh, l dh], W2 [dh, dh] (shared by the K/V heads)."""

    def __init__(self, block: int, head_dim: int, bias: bool):
        super().__init__()
        self.block = block
        self.pos = nn.Parameter(torch.randn(block, head_dim) * 0.02)
        self.fc1 = nn.Linear(block * head_dim, head_dim, bias=bias)
        self.fc2 = nn.Linear(head_dim, head_dim, bias=bias)

    def forward(self, t: torch.Tensor, first, count, stride: int) -> torch.Tensor:
        """t [b, kv, N, dh] -> the compressed blocks first .. first+count-1, [b, kv, count, dh]; block i reads
        tokens i*stride .. i*stride + l - 1 (clamped to N - 1: such a block is never read)."""
        N = t.shape[2]
        tok = (torch.arange(count, device=t.device) + first)[:, None] * stride + torch.arange(self.block, device=t.device)
        blocks = t[:, :, tok.clamp(max=N - 1)] + self.pos  # [b, kv, count, l, dh]
        return self.fc2(torch.relu(self.fc1(blocks.flatten(3))))


def compressed_count(N, block: int, stride: int):
    """The compressed blocks to compute over N keys: every complete one at a known N, N // stride + 2 (an upper
    bound, at least 2: no axis of size 0 or 1 that the export would specialize on) at a symbolic N."""
    if isinstance(N, int):
        return max(0, (N - block) // stride + 1)
    return N // stride + 2


def overlap_table(block: int, stride: int, select: int, device):
    """The paper's map from compression to selection importance (eq. 9): selection block j sums p_cmp over
    the compression blocks (l'/d) j + r, r = -(l/d - 1) .. l'/d - 1 (those overlapping it), each weighted by
    the number of (m, n), 0 <= m < l'/d, 0 <= n < l/d, with m - n = r: the stride-d segments it shares with
    the selection block. Returns (r [R], weight [R])."""
    a, c = select // stride, block // stride
    r = torch.arange(-(c - 1), a, device=device)
    m, n = torch.arange(a, device=device), torch.arange(c, device=device)
    weight = ((m[:, None] - n[None, :]).flatten()[None, :] == r[:, None]).sum(-1)
    return r, weight


def compressed_attention(m, q, kc, vc, last, key_ok):
    """o_cmp and p_cmp: q [b, h, T, dh] over the compressed blocks kc, vc [b, kv, M, dh]; block i is read by a
    query whose last readable key is `last` [T] iff it ends at or before it (i d + l - 1 <= last) and (padding)
    its last token is one (key_ok [b, M] or None). A query with no block reads nothing: o_cmp = 0."""
    M = kc.shape[2]
    end = torch.arange(M, device=q.device) * m.stride + (m.block - 1)
    ok = (end[None, :] <= last[:, None])[None, None]  # [1, 1, T, M]
    if key_ok is not None:
        ok = ok & key_ok[:, None, None, :]
    s = (q @ _heads(m, kc).transpose(-1, -2)).mul_(1.0 / math.sqrt(q.shape[-1]))
    p = s.masked_fill_(~ok, torch.finfo(s.dtype).min).softmax(-1).masked_fill(~ok, 0.0)
    return p @ _heads(m, vc), p


def _heads(m, t):
    """[b, kv, M, dh] -> [b, h, M, dh], each query head's K/V head: an index_select (repeat_interleave over the
    compressed axis, whose length N // d + 2 is symbolic in the export, would tie the graph to one n)."""
    if m.kv_heads == m.heads:
        return t
    return t.index_select(1, torch.arange(m.heads, device=t.device) // (m.heads // m.kv_heads))


def selection_importance(m, p, N, t, last, key_mask):
    """The selection blocks' importance per K/V head, [b, kv, T, J] (J = ceil(N / l') + topk: the last topk
    columns padding, never valid): p_cmp summed over the heads of a GQA group, mapped to selection blocks by
    overlap_table; the initial block and the two local ones (the query's own and the one before) +inf, blocks
    starting after `last` (or at padding) -inf. Also returns the valid mask [b | 1, 1, T, J]."""
    b, h, T, M = p.shape
    kv = m.kv_heads
    pg = F.pad(p.view(b, kv, h // kv, T, M).sum(2), (0, 1))  # [b, kv, T, M + 1]: column M is zero
    J = (N + m.select - 1) // m.select + m.topk
    j = torch.arange(J, device=p.device)
    r, _ = overlap_table(m.block, m.stride, m.select, p.device)
    idx = j[:, None] * (m.select // m.stride) + r  # [J, R]
    idx = torch.where((idx >= 0) & (idx < M), idx, M)
    a, c = m.select // m.stride, m.block // m.stride
    w = [sum(1 for u in range(a) for v in range(c) if u - v == rr) for rr in range(-(c - 1), a)]  # weight, as numbers
    imp = pg[..., idx[:, 0]] * float(w[0])  # [b, kv, T, J]: one overlap offset at a time (R <= l'/d + l/d - 1),
    for i in range(1, len(w)):  # never a [T, J, R] tensor
        imp.add_(pg[..., idx[:, i]], alpha=float(w[i]))
    start = j * m.select
    valid = (start[None, :] <= last[:, None]) & (start[None, :] < N)  # [T, J]
    valid = valid[None, None] if key_mask is None else valid & key_mask[:, start.clamp(max=N - 1)][:, None, None, :]
    own = torch.div(t, m.select, rounding_mode="floor")[:, None]
    forced = valid & ((j == 0) | (j == own) | (j == own - 1))
    imp = imp.masked_fill(~valid, float("-inf")).masked_fill(forced, float("inf"))
    return imp, valid
