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
    """t [b, kv, N, dh] at pos [b, kv, T, S] -> [b kv, T, S, dh] (one index per element: the export's form)."""
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


def _block_rows(t, L: int):
    """t [b, kv, N, dh] as rows of whole selection blocks, [b kv J', L dh] (J' = ceil(N / L); zero-padded, a copy,
    when L does not divide N)."""
    b, kv, N, dh = t.shape
    pad = -N % L
    return (F.pad(t, (0, 0, 0, pad)) if pad else t).reshape(b * kv * ((N + pad) // L), L * dh)


def _rows(idx, J: int):
    """The block rows [b kv C topk] of the selected blocks idx [b, kv, C, topk] (padding columns, past the last
    block, clamped to it: never read)."""
    b, kv = idx.shape[:2]
    return (torch.arange(b * kv, device=idx.device)[:, None, None] * J
            + idx.clamp(max=J - 1).view(b * kv, -1, idx.shape[-1])).flatten()


def _chunk(m, q, kb, vb, kbuf, vbuf, J: int, N: int, idx, valid, t, last, key_mask, i0: int, i1: int):
    """o_slc of queries i0 .. i1-1, [b, h, C, dh]: their blocks copied into the buffers, SDPA (a function, so that
    a chunk's temporaries are gone before the next one's)."""
    b, h, _, dh = q.shape
    kv, C = m.kv_heads, i1 - i0
    _, keep = _keys(m, idx[:, :, i0:i1], valid[:, :, i0:i1], t[i0:i1], last[i0:i1], key_mask, N)
    rows = _rows(idx[:, :, i0:i1], J)
    ks = torch.index_select(kb, 0, rows, out=kbuf[:rows.numel()]).view(b * kv, C, -1, dh)
    vs = torch.index_select(vb, 0, rows, out=vbuf[:rows.numel()]).view(b * kv, C, -1, dh)
    oc = F.scaled_dot_product_attention(_grouped(q[:, :, i0:i1], kv), ks, vs, attn_mask=keep.view(b * kv, C, 1, -1))
    return oc.reshape(b, kv, C, h // kv, dh).transpose(2, 3).reshape(b, h, C, dh)


class SelectedAttention(torch.autograd.Function):
    """The chunked selection branch with a recomputing backward (see the module docstring). A chunk's keys and
    values are copied as whole blocks (rows of l' dh: index_select, a memcpy per block) into two buffers made once
    per call and reused by every chunk (a fresh [C, S, dh] per chunk would be new pages each time: 10x slower)."""

    @staticmethod
    def forward(ctx, q, k, v, m, idx, valid, t, last, key_mask):
        b, h, T, dh = q.shape
        kv, N, L = m.kv_heads, k.shape[2], m.select
        kb, vb = _block_rows(k, L), _block_rows(v, L)
        J, C0 = kb.shape[0] // (b * kv), min(T, CHUNK)
        kbuf, vbuf = kb.new_empty(b * kv * C0 * m.topk, L * dh), vb.new_empty(b * kv * C0 * m.topk, L * dh)
        o = q.new_empty(q.shape)
        for i0, i1 in _chunks(T):
            o[:, :, i0:i1] = _chunk(m, q, kb, vb, kbuf, vbuf, J, N, idx, valid, t, last, key_mask, i0, i1)
        ctx.m = m
        ctx.save_for_backward(q, k, v, idx, valid, t, last, o, key_mask)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, idx, valid, t, last, o, key_mask = ctx.saved_tensors
        m = ctx.m
        b, h, T, dh = q.shape
        kv, N, L = m.kv_heads, k.shape[2], m.select
        scale = 1.0 / math.sqrt(dh)
        kb, vb = _block_rows(k, L), _block_rows(v, L)
        J, C0 = kb.shape[0] // (b * kv), min(T, CHUNK)
        kbuf, vbuf = kb.new_empty(b * kv * C0 * m.topk, L * dh), vb.new_empty(b * kv * C0 * m.topk, L * dh)
        dq, dkb, dvb = torch.empty_like(q), torch.zeros_like(kb), torch.zeros_like(vb)
        for i0, i1 in _chunks(T):
            C = i1 - i0
            _, keep = _keys(m, idx[:, :, i0:i1], valid[:, :, i0:i1], t[i0:i1], last[i0:i1], key_mask, N)
            rows = _rows(idx[:, :, i0:i1], J)
            kr, vr = kbuf[:rows.numel()], vbuf[:rows.numel()]
            ks = torch.index_select(kb, 0, rows, out=kr).view(b * kv, C, -1, dh)  # [b kv, C, S, dh]
            vs = torch.index_select(vb, 0, rows, out=vr).view(b * kv, C, -1, dh)
            qs, dos, os = (_grouped(a[:, :, i0:i1], kv) for a in (q, do, o))  # [b kv, C, g, dh]
            s = (qs @ ks.transpose(-1, -2)).mul_(scale).masked_fill_(~keep.view(b * kv, C, 1, -1), float("-inf"))
            p = s.softmax(-1)  # [b kv, C, g, S]
            del s
            ds = (dos @ vs.transpose(-1, -2)).sub_((dos * os).sum(-1, keepdim=True)).mul_(p)  # dL/ds
            torch.matmul(p.transpose(-1, -2), dos, out=vs)  # dL/dvs, into the values' buffer
            del p
            dq[:, :, i0:i1] = (ds @ ks).mul_(scale).view(b, kv, C, h // kv, dh).transpose(2, 3).reshape(b, h, C, dh)
            torch.matmul(ds.transpose(-1, -2), qs, out=ks).mul_(scale)  # dL/dks, into the keys' buffer
            del ds
            dkb.index_add_(0, rows, kr)
            dvb.index_add_(0, rows, vr)
            del keep, rows, ks, vs, qs, dos, os  # before the next chunk's
        dk, dv = (g.view(b, kv, -1, dh)[:, :, :N] for g in (dkb, dvb))
        return dq, dk, dv, None, None, None, None, None, None


def selected_attention(m, q, k, v, idx, valid, t, last, key_mask):
    """o_slc [b, h, T, dh]: queries q at positions t (their last readable key `last`) over their selected blocks
    idx [b, kv, T, topk] of k, v [b, kv, N, dh] (valid: the blocks they may read, [b | 1, 1, T, J])."""
    if not isinstance(q.shape[2], int):  # export: one piece
        return _attend(m, q, k, v, idx, valid, t, last, key_mask)
    return SelectedAttention.apply(q, k, v, m, idx, valid, t, last, key_mask)
