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


def _scan(a, x, h0, chunk: int, reverse: bool = False) -> torch.Tensor:
    """h [b, n, D] (a new tensor) of h_t = a_t h_{t-1} + x_t, a broadcast to x (real or complex), no autograd.
    reverse: h_t = a_t h_{t+1} + x_t from the end (a_t then multiplies the successor's state), h0 after the end."""
    b, n, D = x.shape
    out = torch.empty_like(x)
    starts = range(0, n, chunk)
    for s in (reversed(starts) if reverse else starts):
        e = min(s + chunk, n)
        A = (a if a.dim() == 1 else a[:, s:e]).expand(b, e - s, D).clone()
        H = out[:, s:e]
        H.copy_(x[:, s:e])
        for k in levels(e - s):  # the product first, then the add: never reads what it writes
            if reverse:
                H[:, :-k] += A[:, :-k] * H[:, k:]
                A[:, :-k] = A[:, :-k] * A[:, k:]
            else:
                H[:, k:] += A[:, k:] * H[:, :-k]
                A[:, k:] = A[:, k:] * A[:, :-k]
        if h0 is not None:
            H += A * h0[:, None]
        del A
        h0 = H[:, 0] if reverse else H[:, -1]
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
        a = _join(ar, ai)
        a = a.conj() if cplx else a
        if a.dim() == 3:  # the successor's decay at each token (the last one multiplies nothing)
            a = torch.cat((a[:, 1:], torch.zeros_like(a[:, :1])), 1)
        g = _scan(a, _join(ghr, torch.zeros_like(ghr) if ghi is None and cplx else ghi), None, ctx.chunk, True)
        gr, gi = _parts(g, cplx)
        del g
        grads = [None, None, gr, gi, None, None, None]
        if any(ctx.needs_input_grad[:2]):
            grads[0], grads[1] = _decay_grad(gr, gi, hr, hi, h0r, h0i, ar.dim() == 1)
        if h0r is not None and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5]):
            a0 = (ar, ai) if ar.dim() == 1 else (ar[:, 0], None if ai is None else ai[:, 0])
            grads[4], grads[5] = _mul(a0[0], None if ai is None else -a0[1], gr[:, 0], None if gi is None else gi[:, 0])
        return tuple(grads)


def _decay_grad(gr, gi, hr, hi, h0r, h0i, fixed: bool):
    """dL/da_t = g_t conj(h_{t-1}) on pairs; fixed (a [D]): summed over (b, n) one real product at a time."""
    if not fixed:
        zero = torch.zeros_like(hr[:, :1])
        pr = torch.cat((zero if h0r is None else h0r[:, None], hr[:, :-1]), 1)
        pi = None if hi is None else torch.cat((zero if h0i is None else h0i[:, None], hi[:, :-1]), 1)
        return _mul(gr, gi, pr, None if pi is None else -pi)

    def dot(x, y, y0):
        out = (x[:, 1:] * y[:, :-1]).sum((0, 1))
        return out if y0 is None else out + (x[:, 0] * y0).sum(0)

    re = dot(gr, hr, h0r) + (0 if hi is None else dot(gi, hi, h0i))
    return re, (None if hi is None else dot(gi, hr, h0r) - dot(gr, hi, h0i))


def diag_scan(ar, ai, xr, xi, h0=None, chunk: int = 64):
    """(h_re [b, n, D], h_im or None): every state of h_t = a_t h_{t-1} + x_t, from h0 = (re, im) or None."""
    h0r, h0i = (None, None) if h0 is None else h0
    if ai is not None and xi is None:
        xi = torch.zeros_like(xr)
    dtype = torch.promote_types(ar.dtype, xr.dtype)  # decays from float32 parameters, inputs from autocast
    if ai is not None and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32  # no complex bfloat16: the complex scan runs in float32 under autocast
    if xr.dtype != dtype or ar.dtype != dtype:
        ar, ai, xr, xi, h0r, h0i = (None if t is None else t.to(dtype) for t in (ar, ai, xr, xi, h0r, h0i))
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
