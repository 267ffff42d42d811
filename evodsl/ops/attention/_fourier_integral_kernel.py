"""The tiled kernel of mha(fourier_integral) (fourier_integral.py): query blocks x key blocks, an online
normalisation (as flash attention's), and a backward that recomputes each tile, so that no [n, n, dh] or [n, n]
tensor is ever held: O(tile) working memory, tile = b h B^2 dh.

Scores s_ij = p sum_l log|sinc(R (q_il - k_jl))| (log of the product kernel, p the even power of phi), the
weights a_ij = exp(s_ij) / sum_j exp(s_ij), o_i = sum_j a_ij v_j. Every per-tile tensor lives in a workspace
allocated once per call (out= and in-place ops), so that the bytes allocated in total grow as the bytes held
(tests/ops/test_growth.py): only the tiles that cross the causal diagonal allocate their small mask.

Layouts: q [b, nq, kv, g, dh] (the q projection's [b, nq, h dh], query head = K/V head x its group of g), k, v
[b, nk, kv, dh]; query i (at position i + offset) reads key j iff j <= i + offset when causal; pad: bool [b, nk],
True at a padded key (no weight). A query with no key left (left padding, causal) outputs 0.
"""
from __future__ import annotations

import math

import torch

NEG = -1e30  # the running max starts here, not at -inf: no -inf - -inf for a row whose keys are all masked


class _Workspace:
    """One flat buffer per role; `get(role, *shape)` is a contiguous view of its first prod(shape) elements."""

    def __init__(self, like: torch.Tensor, sizes: dict):
        self.bufs = {k: like.new_empty(n) for k, n in sizes.items()}

    def get(self, role: str, *shape) -> torch.Tensor:
        return self.bufs[role][:math.prod(shape)].view(shape)


def _blocks(n: int, B: int):
    return [(i, min(i + B, n)) for i in range(0, n, B)]


def _key_end(i1: int, nk: int, offset: int, causal: bool) -> int:
    return min(nk, i1 + offset) if causal else nk


def _log_kernel(X, Z, S, power: float):
    """X = R (q - k) (a tile [.., Bq, Bk, dh]) -> S = p sum_l log|sin x / x| [.., Bq, Bk], Z the tile it works in:
    sin x / x is 0 / 0 = nan only at x = 0, where sinc is 1 (torch's sinc_ is 7x slower than sin and a division).
    A zero of the kernel would be log 0 = -inf, no weight (float sin is 0 only at 0)."""
    torch.sin(X, out=Z)
    Z.div_(X).nan_to_num_(nan=1.0).abs_().log_()
    torch.sum(Z, -1, out=S)
    S.mul_(power)


def _mask(S, i0: int, j0: int, offset: int, causal: bool, pad):
    """-inf where key j0 + c may not be read by query i0 + r: after it (causal), or padded."""
    bq, bk = S.shape[-2:]
    if causal and j0 + bk - 1 > i0 + offset:  # the tile crosses the diagonal: O(n / B) such tiles
        r = torch.arange(bq, device=S.device)[:, None]
        c = torch.arange(bk, device=S.device)[None, :]
        S.masked_fill_(c - r > i0 + offset - j0, float("-inf"))
    if pad is not None:
        S.masked_fill_(pad[:, None, None, None, j0:j0 + bk], float("-inf"))


def fourier_forward(q, k, v, R, power: float, B: int, causal: bool, offset: int = 0, pad=None):
    """o [b, nq, kv, g, dh] and the log normaliser lse [b, kv, g, nq] (float32 or the dtype, as q)."""
    b, nq, kv, g, dh = q.shape
    nk = k.shape[1]
    bq, bk = min(B, nq), min(B, nk)
    vt = v.transpose(1, 2).contiguous().view(b * kv, nk, dh)  # key blocks as batched-matmul views
    o = q.new_empty(b, nq, kv, g, dh)
    lse = q.new_empty(b, kv, g, nq)
    q, k = q * R, k * R  # scaled once: a tile is one difference
    rows = b * kv * g * bq
    ws = _Workspace(q, {"X": rows * bk * dh, "Z": rows * bk * dh, "S": rows * bk, "acc": rows * dh,
                        "pv": rows * dh, "m": rows, "m_new": rows, "l": rows, "c": rows})
    for i0, i1 in _blocks(nq, B):
        r = i1 - i0
        qb = q[:, i0:i1].permute(0, 2, 3, 1, 4).unsqueeze(-2)  # [b, kv, g, r, 1, dh]
        m, l, acc = ws.get("m", b, kv, g, r), ws.get("l", b, kv, g, r), ws.get("acc", b, kv, g, r, dh)
        m_new, c = ws.get("m_new", b, kv, g, r), ws.get("c", b, kv, g, r)
        m.fill_(NEG), l.zero_(), acc.zero_()
        for j0, j1 in _blocks(_key_end(i1, nk, offset, causal), B):
            w = j1 - j0
            X, Z, S = ws.get("X", b, kv, g, r, w, dh), ws.get("Z", b, kv, g, r, w, dh), ws.get("S", b, kv, g, r, w)
            torch.sub(qb, k[:, j0:j1].transpose(1, 2)[:, :, None, None], out=X)
            _log_kernel(X, Z, S, power)
            _mask(S, i0, j0, offset, causal, pad)
            torch.amax(S, -1, out=c)
            torch.maximum(m, c, out=m_new)
            S.sub_(m_new[..., None]).exp_()  # the tile's weights, unnormalised
            torch.sub(m, m_new, out=c)
            c.exp_()  # the old sums' correction
            l.mul_(c)
            acc.mul_(c[..., None])
            m.copy_(m_new)
            l.add_(torch.sum(S, -1, out=c))
            pv = ws.get("pv", b * kv, g * r, dh)
            torch.bmm(S.view(b * kv, g * r, w), vt[:, j0:j1], out=pv)
            acc.add_(pv.view(b, kv, g, r, dh))
        l.clamp_min_(torch.finfo(l.dtype).tiny)  # a row with no key: acc = 0, o = 0
        acc.div_(l[..., None])
        o[:, i0:i1].copy_(acc.permute(0, 3, 1, 2, 4))
        lse[..., i0:i1].copy_(l.log_().add_(m))
    return o, lse


def fourier_backward(do, q, k, v, R, o, lse, power: float, B: int, causal: bool, offset: int = 0, pad=None):
    """The gradients of q, k, v and R, each tile recomputed: P = exp(s - lse), dS = P (dP - D) with
    D_i = do_i . o_i, and ds_ij / dq_il = p R g(x_ijl) = -ds_ij / dk_jl, x = R (q_il - k_jl), g(x) = d/dx
    log|sin x / x| = cot x - 1/x (0 at x = 0, its limit). With G_q = sum_j dS g and G_k = -sum_i dS g:
    dq = p R G_q, dk = p R G_k and dR = p sum_ij dS_ij sum_l (q_il - k_jl) g = p (<q, G_q> + <k, G_k>)."""
    b, nq, kv, g, dh = q.shape
    nk = k.shape[1]
    bq, bk = min(B, nq), min(B, nk)
    D = (do * o).sum(-1).permute(0, 2, 3, 1)  # [b, kv, g, nq]
    vt = v.transpose(1, 2).contiguous().view(b * kv, nk, dh)
    qs, ks = q * R, k * R
    gq = torch.zeros_like(q)
    gkt = q.new_zeros(b, kv, nk, dh)
    dvt = q.new_zeros(b * kv, nk, dh)
    rows = b * kv * g * bq
    ws = _Workspace(q, {"Y": rows * bk * dh, "Z": rows * bk * dh, "S": rows * bk, "dP": rows * bk,
                        "do": rows * dh, "gq": rows * dh, "sq": rows * dh, "gk": b * kv * bk * dh,
                        "dv": b * kv * bk * dh})
    for i0, i1 in _blocks(nq, B):
        r = i1 - i0
        qb = qs[:, i0:i1].permute(0, 2, 3, 1, 4).unsqueeze(-2)
        dob = ws.get("do", b, kv, g, r, dh)
        dob.copy_(do[:, i0:i1].permute(0, 2, 3, 1, 4))
        gqb, sq = ws.get("gq", b, kv, g, r, dh), ws.get("sq", b, kv, g, r, dh)
        gqb.zero_()
        Db, lb = D[..., i0:i1, None], lse[..., i0:i1, None]
        for j0, j1 in _blocks(_key_end(i1, nk, offset, causal), B):
            w = j1 - j0
            Y, Z = ws.get("Y", b, kv, g, r, w, dh), ws.get("Z", b, kv, g, r, w, dh)
            S, dP = ws.get("S", b, kv, g, r, w), ws.get("dP", b, kv, g, r, w)
            torch.sub(qb, ks[:, j0:j1].transpose(1, 2)[:, :, None, None], out=Y)  # x = R (q - k)
            _log_kernel(Y, Z, S, power)
            _mask(S, i0, j0, offset, causal, pad)
            S.sub_(lb).exp_()  # P
            dv = ws.get("dv", b * kv, w, dh)
            torch.bmm(S.view(b * kv, g * r, w).transpose(1, 2), dob.view(b * kv, g * r, dh), out=dv)
            dvt[:, j0:j1].add_(dv)
            torch.bmm(dob.view(b * kv, g * r, dh), vt[:, j0:j1].transpose(1, 2), out=dP.view(b * kv, g * r, w))
            dP.sub_(Db).mul_(S)  # dS
            torch.tan(Y, out=Z)
            Z.reciprocal_().sub_(Y.reciprocal_()).nan_to_num_(nan=0.0)  # g(x); cot 0 - 1/0 = nan -> 0
            Z.mul_(dP[..., None])  # dS g
            gqb.add_(torch.sum(Z, -2, out=sq))
            gk = ws.get("gk", b, kv, w, dh)
            gkt[:, :, j0:j1].sub_(torch.sum(Z.view(b, kv, g * r, w, dh), 2, out=gk))
        gq[:, i0:i1].copy_(gqb.permute(0, 3, 1, 2, 4))
    del ws, qs, ks
    gk = gkt.transpose(1, 2)
    dR = ((q * gq).sum() + (k * gk).sum()) * power
    scale = power * R
    return gq.mul_(scale), gk.mul_(scale), dvt.view(b, kv, nk, dh).transpose(1, 2), dR


class FourierIntegral(torch.autograd.Function):
    """fourier_forward with a recomputing backward: keeps q, k, v, o and lse (per query), no tile."""

    @staticmethod
    def forward(ctx, q, k, v, R, power, B, causal, offset, pad):
        o, lse = fourier_forward(q, k, v, R, power, B, causal, offset, pad)
        ctx.save_for_backward(q, k, v, R, o, lse)
        ctx.args = (power, B, causal, offset, pad)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, R, o, lse = ctx.saved_tensors
        dq, dk, dv, dR = fourier_backward(do, q, k, v, R, o, lse, *ctx.args)
        return dq, dk, dv, dR, None, None, None, None, None
