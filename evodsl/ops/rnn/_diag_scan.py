"""The diagonal linear recurrence shared by the elementwise RNNs and diagonal SSMs (rnn(qrnn), rnn(sru), rnn(gilr),
ssm(lru), ssm(s5)): per channel,

    h_t = a_t h_{t-1} + x_t,      a_t real in [0, 1], or complex with |a_t| <= 1; h_{-1} = h0 (or 0)

Complex values travel as pairs of real tensors (re, im), im None for a real recurrence: the layers' projections
stay real matmuls and the export stays real (ONNX has no complex type). a is [D] (time-invariant: LRU, S5) or
[b, n, D] (gated: QRNN, SRU, GILR); x and h are [b, n, D].

Training and prefill (diag_scan): an autograd Function over chunks of T tokens (a Python loop over chunks, never
over tokens). Inside a chunk, a doubling scan (Hillis-Steele) on pairs (A, H): level k sets
H_t <- H_t + A_t H_{t-k}, A_t <- A_t A_{t-k}; after ceil(log2 T) levels H_t = sum_{s <= t} (a_{s+1} .. a_t) x_s within
the chunk and A_t = a_0 .. a_t, so that the carry adds A_t h_prev. Every factor is a product of decays, at most 1
in modulus (no exp(-S) that could overflow, no division). O(n D log T) elementwise; no matmul. The forward keeps
only a, h0 and the states h; the backward is the reverse recurrence, run by the same kernel on the flipped sequence:

    g_t = dL/dh_t + conj(a_{t+1}) g_{t+1},    dL/dx_t = g_t,    dL/da_t = g_t conj(h_{t-1}),   dL/dh0 = conj(a_0) g_0

(Martin and Cundy 2018, arXiv:1709.04057, Section 3: the backward of a linear recurrence is a linear recurrence).
The export (exported_scan, a symbolic n) runs the doubling on pairs over the whole sequence, EXPORT_LEVELS levels,
the shifts gathered and masked. The step (diag_step) is one token of the recurrence.
"""
from __future__ import annotations

import torch

EXPORT_LEVELS = 16  # the export's doubling levels: exact for n <= 2^16


def levels(T: int) -> list:
    """The doubling shifts 1, 2, 4, ... below T."""
    out, k = [], 1
    while k < T:
        out.append(k)
        k *= 2
    return out


def _mul(ar, ai, br, bi):
    """(ar + i ai)(br + i bi) on pairs; ai, bi None: real."""
    if ai is None and bi is None:
        return ar * br, None
    if ai is None:
        return ar * br, ar * bi
    if bi is None:
        return ar * br, ai * br
    return ar * br - ai * bi, ar * bi + ai * br


def _join(re, im):
    return re if im is None else torch.complex(re, im)


def _scan(a, x, h0, chunk: int) -> torch.Tensor:
    """h [b, n, D] (a new tensor) of h_t = a_t h_{t-1} + x_t, a broadcast to x (real or complex), no autograd."""
    b, n, D = x.shape
    out = torch.empty_like(x)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        A = (a if a.dim() == 1 else a[:, s:e]).expand(b, e - s, D).clone()
        H = out[:, s:e]
        H.copy_(x[:, s:e])
        for k in levels(e - s):
            H[:, k:] += A[:, k:] * H[:, :-k]  # the product first, then the add: never reads what it writes
            A[:, k:] = A[:, k:] * A[:, :-k]
        if h0 is not None:
            H += A * h0[:, None]
        del A
        h0 = H[:, -1]
    return out


def _parts(h, complex_: bool):
    return (h.real.contiguous(), h.imag.contiguous()) if complex_ else (h, None)


class _DiagScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ar, ai, xr, xi, h0r, h0i, chunk):
        cplx = ai is not None
        a, h0 = _join(ar, ai), None if h0r is None else _join(h0r, h0i)
        hr, hi = _parts(_scan(a, _join(xr, xi), h0, chunk), cplx)
        ctx.save_for_backward(ar, ai, hr, hi, h0r, h0i)
        ctx.chunk = chunk
        return hr, hi

    @staticmethod
    def backward(ctx, ghr, ghi):
        ar, ai, hr, hi, h0r, h0i = ctx.saved_tensors
        cplx = ai is not None
        b, n, D = hr.shape
        a = _join(ar, ai)
        a = a.conj() if cplx else a
        g = _join(ghr, torch.zeros_like(ghr) if ghi is None and cplx else ghi)
        # the reverse recurrence on the flipped sequence: its decay at flipped step t is conj(a) of the next token
        if a.dim() == 1:
            rev = a
        else:
            rev = torch.cat((a[:, :1], a[:, 1:].flip(1)), 1)  # flipped step 0 multiplies a zero state
        g = _scan(rev, g.flip(1), None, ctx.chunk).flip(1)
        grads = [None] * 7
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            grads[2], grads[3] = _parts(g, cplx)
        h = _join(hr, hi)
        if any(ctx.needs_input_grad[:2]):
            prev = torch.cat(((torch.zeros_like(h[:, :1]) if h0r is None else _join(h0r, h0i)[:, None]), h[:, :-1]), 1)
            ga = g * (prev.conj() if cplx else prev)
            del prev
            ga = ga.sum((0, 1)) if ar.dim() == 1 else ga
            grads[0], grads[1] = _parts(ga, cplx)
        if h0r is not None and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5]):
            a0 = a if a.dim() == 1 else a[:, 0]
            grads[4], grads[5] = _parts(a0 * g[:, 0], cplx)
        return tuple(grads)


def diag_scan(ar, ai, xr, xi, h0=None, chunk: int = 64):
    """(h_re [b, n, D], h_im or None): every state of h_t = a_t h_{t-1} + x_t, from h0 = (re, im) or None."""
    h0r, h0i = (None, None) if h0 is None else h0
    if ai is not None and xi is None:
        xi = torch.zeros_like(xr)
    return _DiagScan.apply(ar, ai, xr, xi, h0r, h0i, chunk)


def diag_step(ar, ai, xr, xi, h):
    """One token: h = a h + x on pairs (a [D] or [b, D]; x, h [b, D])."""
    pr, pi = _mul(ar, ai, h[0], h[1])
    return pr + xr, (None if pi is None else pi + xi)


def exported_scan(ar, ai, xr, xi):
    """The export's form (a symbolic n, no loop over chunks to trace): doubling over the whole sequence on pairs
    (decay, state), EXPORT_LEVELS levels, a shift past the start reading nothing. O(n D) at a fixed level count."""
    n = xr.shape[1]
    Ar = ar.expand_as(xr)
    Ai = None if ai is None else ai.expand_as(xr)
    Hr, Hi = xr, xi
    pos = torch.arange(n, device=xr.device)
    for j in range(EXPORT_LEVELS):
        k = 1 << j
        idx, keep = (pos - k).clamp(min=0), (pos >= k).to(xr.dtype)[:, None]
        sr, si = Hr.index_select(1, idx) * keep, None if Hi is None else Hi.index_select(1, idx) * keep
        pr, pi = _mul(Ar, Ai, sr, si)
        Hr, Hi = Hr + pr, (None if Hi is None else Hi + pi)
        qr, qi = _mul(Ar, Ai, Ar.index_select(1, idx), None if Ai is None else Ai.index_select(1, idx))
        Ar, Ai = qr * keep + (1 - keep), (None if qi is None else qi * keep)
    return Hr, Hi
