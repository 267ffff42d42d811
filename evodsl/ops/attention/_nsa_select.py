"""mha(nsa)'s selection branch (nsa.py): each query of a GQA group (b, K/V head) attends the tokens of its topk
selected blocks, S = topk l' keys gathered per query.

The forward and the decoding steps run it in chunks of CHUNK queries: a chunk gathers its [C, S, dh] keys and
values, attends (SDPA) and lets them go, so nothing of size [n, S, dh] is ever alive (it would be topk l' dh / n
times an n x n score matrix: 16 GiB at n = 4096 with the paper's sizes). The backward (SelectedAttention) recomputes
each chunk's gather and softmax weights and scatter-adds the keys' and values' gradients: training keeps q, k, v,
the selection indices and the output, O(n (h dh + kv topk)). The export (a symbolic n: no Python loop over its
chunks) runs one chunk of every query."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CHUNK = 64  # queries per chunk


def _keys(m, idx, valid, t, last, key_mask, N):
    """For queries t (idx [b, kv, T, topk] their selected blocks): the token of each of their S keys, pos [b, kv,
    T, S] (clamped to N - 1), and which they read, keep: those of valid blocks, up to `last`, before N, not padding;
    a query left with no key (a padded one) reads its own position."""
    b, kv, T, _ = idx.shape
    S = m.topk * m.select
    pos = (idx[..., None] * m.select + torch.arange(m.select, device=idx.device)).flatten(3)  # [b, kv, T, S]
    keep = valid.expand(b, kv, T, -1).gather(3, idx).repeat_interleave(m.select, dim=3)
    keep = keep & (pos <= last[:, None]) & (pos < N)
    pos = pos.clamp(max=N - 1)
    if key_mask is not None:
        keep = keep & key_mask.gather(1, pos.flatten(1)).view(b, kv, T, S)
        keep = keep | ((pos == t[:, None]) & ~keep.any(-1, keepdim=True))
    return pos, keep


def _gather(t, pos):
    """t [b, kv, N, dh] at pos [b, kv, T, S] -> [b kv, T, S, dh]."""
    b, kv, T, S = pos.shape
    at = pos.flatten(2)[..., None].expand(-1, -1, -1, t.shape[-1])
    return t.gather(2, at).view(b * kv, T, S, t.shape[-1])


def _grouped(q, kv):
    """q [b, h, T, dh] -> [b kv, T, g, dh] (each K/V head's g query heads side by side)."""
    b, h, T, dh = q.shape
    return q.reshape(b, kv, h // kv, T, dh).transpose(2, 3).reshape(b * kv, T, h // kv, dh)


def _attend(m, q, k, v, idx, valid, t, last, key_mask):
    """o_slc for queries t in one piece: [b, h, T, dh]."""
    b, h, T, dh = q.shape
    kv = m.kv_heads
    pos, keep = _keys(m, idx, valid, t, last, key_mask, k.shape[2])
    o = F.scaled_dot_product_attention(_grouped(q, kv), _gather(k, pos), _gather(v, pos),
                                       attn_mask=keep.view(b * kv, T, 1, -1))
    return o.reshape(b, kv, T, h // kv, dh).transpose(2, 3).reshape(b, h, T, dh)


def _chunks(T: int):
    return [(i, min(i + CHUNK, T)) for i in range(0, T, CHUNK)]


class SelectedAttention(torch.autograd.Function):
    """The chunked selection branch with a recomputing backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, m, idx, valid, t, last, key_mask):
        o = q.new_empty(q.shape)
        for i0, i1 in _chunks(q.shape[2]):
            o[:, :, i0:i1] = _attend(m, q[:, :, i0:i1], k, v, idx[:, :, i0:i1], valid[:, :, i0:i1],
                                     t[i0:i1], last[i0:i1], key_mask)
        ctx.m = m
        ctx.save_for_backward(q, k, v, idx, valid, t, last, o, key_mask)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, idx, valid, t, last, o, key_mask = ctx.saved_tensors
        m = ctx.m
        b, h, T, dh = q.shape
        kv, N = m.kv_heads, k.shape[2]
        scale = 1.0 / math.sqrt(dh)
        dq = torch.empty_like(q)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        for i0, i1 in _chunks(T):
            C = i1 - i0
            pos, keep = _keys(m, idx[:, :, i0:i1], valid[:, :, i0:i1], t[i0:i1], last[i0:i1], key_mask, N)
            qs, dos, os = (_grouped(a[:, :, i0:i1], kv) for a in (q, do, o))  # [b kv, C, g, dh]
            ks, vs = _gather(k, pos), _gather(v, pos)  # [b kv, C, S, dh]
            s = (qs @ ks.transpose(-1, -2)).mul_(scale).masked_fill_(~keep.view(b * kv, C, 1, -1), float("-inf"))
            p = s.softmax(-1)  # [b kv, C, g, S]
            del s
            ds = (dos @ vs.transpose(-1, -2)).sub_((dos * os).sum(-1, keepdim=True)).mul_(p)  # dL/ds
            dvs = p.transpose(-1, -2) @ dos  # [b kv, C, S, dh]
            del p, vs
            dq[:, :, i0:i1] = (ds @ ks).mul_(scale).view(b, kv, C, h // kv, dh).transpose(2, 3).reshape(b, h, C, dh)
            dks = (ds.transpose(-1, -2) @ qs).mul_(scale)
            del ds, ks
            at = pos.flatten(2)[..., None].expand(-1, -1, -1, dh)
            dk.scatter_add_(2, at, dks.view(b, kv, C * pos.shape[-1], dh))
            dv.scatter_add_(2, at, dvs.view(b, kv, C * pos.shape[-1], dh))
            del dks, dvs  # before the next chunk's gather
        return dq, dk, dv, None, None, None, None, None, None


def selected_attention(m, q, k, v, idx, valid, t, last, key_mask):
    """o_slc [b, h, T, dh]: queries q at positions t (their last readable key `last`) over their selected blocks
    idx [b, kv, T, topk] of k, v [b, kv, N, dh] (valid: the blocks they may read, [b | 1, 1, T, J])."""
    if not isinstance(q.shape[2], int):  # export: one piece
        return _attend(m, q, k, v, idx, valid, t, last, key_mask)
    return SelectedAttention.apply(q, k, v, m, idx, valid, t, last, key_mask)
