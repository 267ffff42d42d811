"""The blocked kernel of mha(sigmoid) (sigmoid.py): o_t = sum_j sigmoid(q_t . k_j * scale + b - m |t - j|) v_j
(m: ALiBi's slope of the head, or none) over query blocks against key blocks of B positions, never an n x n
tensor. A causal call skips the key blocks after each query block's last position and masks the rest of its
diagonal; a masked pair (a later key, a padded key) has weight 0, as sigmoid(-inf). The backward (a custom autograd
Function, as FlashSigmoid's) keeps only q, k, v (and the key mask) and recomputes each block's weights:
p = sigmoid(s), dS = dP * p * (1 - p).

Every per-block tensor lives in a workspace allocated once per call (out= and in-place ops), so that the bytes
allocated in total grow as the bytes held (tests/ops/test_growth.py): only the blocks that cross the causal
diagonal allocate their small mask. Grouped K/V heads: the g = h / kv query heads of a K/V head are folded into the
rows of its block ([b kv, g B, dh] against [b kv, B, dh]), so the matmuls sum dK and dV over the group.
"""
from __future__ import annotations

import math

import torch


class _Workspace:
    """One flat buffer per role; `get(role, *shape)` is a contiguous view of its first prod(shape) elements."""

    def __init__(self, like: torch.Tensor, sizes: dict):
        self.bufs = {k: like.new_empty(n) for k, n in sizes.items()}

    def get(self, role: str, *shape) -> torch.Tensor:
        return self.bufs[role][:math.prod(shape)].view(shape)


def _blocks(n: int, block: int) -> list[tuple[int, int]]:
    return [(i, min(i + block, n)) for i in range(0, n, block)]


def _key_end(i1: int, start: int, m: int, causal: bool) -> int:
    """The keys a query block reads: all m, or (causal) those up to its last query's position."""
    return min(m, start + i1) if causal else m


def _workspace(q, k, block: int, slopes, grads: bool) -> _Workspace:
    b, h, n, dh = q.shape
    kv, m = k.shape[1], k.shape[2]
    R, C = min(block, n), min(block, m)
    rows = ["q", "acc", "pv"] + (["do"] if grads else [])  # pv: a block's product, added to its sum
    keys = ["k", "v"] + (["pk"] if grads else [])  # pk: a key block's gradient, added to dK's or dV's
    sizes = {**{r: b * h * R * dh for r in rows}, **{r: b * kv * C * dh for r in keys}, "s": b * h * R * C}
    if grads:
        sizes["dp"] = b * h * R * C
    if slopes is not None:
        sizes.update(dist=R * C, bias=h * R * C)
    return _Workspace(q, sizes)


def _weights(ws, qb, k, i0, i1, j0, j1, g: int, start: int, scale: float, bias: float, causal: bool, drop, slopes):
    """The weights of query rows i0..i1 (positions start + i, all heads: qb [b kv, g R, dh]) against keys j0..j1:
    p = sigmoid(q k^T * scale + b - m |i - j|) [b kv, g R, C] in the workspace, zero where masked. Returns
    (p, the key block [b kv, C, dh])."""
    b, kv, _, dh = k.shape
    R, C = i1 - i0, j1 - j0
    kb = ws.get("k", b, kv, C, dh)
    kb.copy_(k[:, :, j0:j1])
    kb = kb.view(b * kv, C, dh)
    s = ws.get("s", b * kv, g * R, C)
    torch.bmm(qb, kb.transpose(1, 2), out=s)
    s.mul_(scale).add_(bias)
    if slopes is not None:  # ALiBi: -m |i - j| from the positions, into the workspace
        dist = ws.get("dist", R, C)
        torch.sub(torch.arange(start + i0, start + i1, dtype=s.dtype, device=s.device)[:, None],
                  torch.arange(j0, j1, dtype=s.dtype, device=s.device)[None, :], out=dist).abs_()
        m = ws.get("bias", kv, g, R, C)
        torch.mul(slopes.view(kv, g, 1, 1), dist, out=m)
        s.view(b, kv, g, R, C).sub_(m)
    p = s.sigmoid_()
    if causal and j1 - 1 > start + i0:  # a block that reaches past its first query: O(n / B) of them
        i = torch.arange(start + i0, start + i1, device=s.device)[:, None]
        j = torch.arange(j0, j1, device=s.device)[None, :]
        p.view(b, kv, g, R, C).masked_fill_(j > i, 0.0)
    if drop is not None:
        p.view(b, kv, g * R, C).masked_fill_(drop[:, None, None, j0:j1], 0.0)
    return p, kb


def _rows(ws, role: str, t, i0: int, i1: int):
    """Rows i0..i1 of t [b, kv, g, n, dh] into the workspace: [b kv, g R, dh]."""
    b, kv, g, _, dh = t.shape
    out = ws.get(role, b, kv, g, i1 - i0, dh)
    out.copy_(t[:, :, :, i0:i1])
    return out.view(b * kv, g * (i1 - i0), dh)


class SigmoidAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, keep, scale: float, bias: float, block: int, causal: bool, start: int, slopes):
        """q [b, h, n, dh] (positions start..), k, v [b, kv, m, dh]; keep: bool [b, m] (False: a padded key) or
        None; slopes: ALiBi's [h], or None. Returns o [b, h, n, dh], laid out [b, n, h, dh] (o_proj reads it
        without a copy)."""
        b, h, n, dh = q.shape
        kv, m = k.shape[1], k.shape[2]
        g = h // kv
        drop = None if keep is None else ~keep
        slopes = None if slopes is None else slopes.to(q.dtype)
        ws = _workspace(q, k, block, slopes, grads=False)
        qg = q.view(b, kv, g, n, dh)
        o = q.new_empty(b, n, kv, g, dh)
        for i0, i1 in _blocks(n, block):
            qb = _rows(ws, "q", qg, i0, i1)
            acc = ws.get("acc", b * kv, g * (i1 - i0), dh)
            for c, (j0, j1) in enumerate(_blocks(_key_end(i1, start, m, causal), block)):
                p, _ = _weights(ws, qb, k, i0, i1, j0, j1, g, start, scale, bias, causal, drop, slopes)
                vb = ws.get("v", b, kv, j1 - j0, dh)
                vb = vb.copy_(v[:, :, j0:j1]).view(b * kv, j1 - j0, dh)
                if c == 0:
                    torch.bmm(p, vb, out=acc)
                else:  # not baddbmm_: FlopCounterMode counts no in-place matmul
                    acc.add_(torch.bmm(p, vb, out=ws.get("pv", *acc.shape)))
            o[:, i0:i1] = acc.view(b, kv, g, i1 - i0, dh).permute(0, 3, 1, 2, 4)
        ctx.save_for_backward(q, k, v, drop, slopes)
        ctx.args = (scale, bias, block, causal, start)
        return o.view(b, n, h, dh).transpose(1, 2)

    @staticmethod
    def backward(ctx, do):
        q, k, v, drop, slopes = ctx.saved_tensors
        scale, bias, block, causal, start = ctx.args
        b, h, n, dh = q.shape
        kv, m = k.shape[1], k.shape[2]
        g = h // kv
        ws = _workspace(q, k, block, slopes, grads=True)
        qg, dog = q.view(b, kv, g, n, dh), do.reshape(b, kv, g, n, dh)
        dq = q.new_empty(b, kv, g, n, dh)
        dk, dv = k.new_zeros(b, kv, m, dh), v.new_zeros(b, kv, m, dh)
        for i0, i1 in _blocks(n, block):
            R = i1 - i0
            qb, dob = _rows(ws, "q", qg, i0, i1), _rows(ws, "do", dog, i0, i1)
            dqb = ws.get("acc", b * kv, g * R, dh)
            for c, (j0, j1) in enumerate(_blocks(_key_end(i1, start, m, causal), block)):
                C = j1 - j0
                p, kb = _weights(ws, qb, k, i0, i1, j0, j1, g, start, scale, bias, causal, drop, slopes)
                vb = ws.get("v", b, kv, C, dh)
                vb = vb.copy_(v[:, :, j0:j1]).view(b * kv, C, dh)
                pk = ws.get("pk", b * kv, C, dh)
                dv[:, :, j0:j1].view(b * kv, C, dh).add_(torch.bmm(p.transpose(1, 2), dob, out=pk))
                ds = ws.get("dp", b * kv, g * R, C)
                torch.bmm(dob, vb.transpose(1, 2), out=ds)  # dP
                ds.mul_(p).mul_(p.neg_().add_(1.0)).mul_(scale)  # dS = dP p (1 - p), scaled for q k^T
                if c == 0:
                    torch.bmm(ds, kb, out=dqb)
                else:
                    dqb.add_(torch.bmm(ds, kb, out=ws.get("pv", *dqb.shape)))
                dk[:, :, j0:j1].view(b * kv, C, dh).add_(torch.bmm(ds.transpose(1, 2), qb, out=pk))
            dq[:, :, :, i0:i1] = dqb.view(b, kv, g, R, dh)
        return dq.view(b, h, n, dh), dk, dv, None, None, None, None, None, None, None


def dense_sigmoid_attention(q, k, v, keep, scale: float, bias: float, causal: bool, start, slopes):
    """The export's form (a symbolic n: no Python loop over blocks): every pair's weight at once, masked, K and V
    repeated to the h query heads."""
    h, kv = q.shape[1], k.shape[1]
    if h != kv:
        k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
    s = q @ k.transpose(-1, -2) * scale + bias  # [b, h, n, m]
    i = torch.arange(q.shape[2], device=q.device)[:, None] + start
    j = torch.arange(k.shape[2], device=q.device)[None, :]
    if slopes is not None:
        s = s - slopes.to(s.dtype)[:, None, None] * (i - j).abs().to(s.dtype)
    p = torch.sigmoid(s)
    if causal:
        p = p * (j <= i).to(p.dtype)
    if keep is not None:
        p = p * keep[:, None, None, :].to(p.dtype)
    return p @ v
