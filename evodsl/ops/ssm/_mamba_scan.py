"""The selective scan of ssm(mamba) (mamba.py): per channel e and state n,

    h_t = a_t h_{t-1} + u_t,      a_t = exp(dt_t A),      u_t = dt_t x_t B_t,      y_t = C_t . h_t

Training and prefill (selective_scan): an autograd Function over chunks of T tokens. The states [b, n, E, N] never
exist for the whole sequence at once: a chunk's decays a and inputs u go into [T, b, N, E] buffers made once (N
before E: y = C h and B g are row-vector matmuls, dB and dC reductions over the contiguous E), and its states are
written over u by a doubling scan (_states: ceil(log2 T) levels over the whole chunk, products of decays only, no
exp(-S) that could overflow, no division; a Python loop over chunks and levels, never over tokens), then y = C h for
the chunk (a batched matmul). The state that leaves or enters selective_scan is [b, E, N] (the decoding state). The
forward keeps only each chunk's incoming state (the carry). The backward walks the chunks in reverse: it recomputes a chunk's states from its
carry, runs the reverse recurrence (Martin and Cundy 2018, arXiv:1709.04057, Section 3)

    g_t = C_t dy_t + a_{t+1} g_{t+1}      (g after the chunk's last token: the next chunk's a_0 g_0, or the
                                           last state's gradient)

and forms the gradients in closed form: du_t = g_t, so dx_t = dt_t (g_t B_t), dB_t = (dt_t x_t) . g_t;
dC_t = dy_t . h_t; with q_t = a_t g_t h_{t-1} (the decay's share), ddt_t = x_t (g_t B_t) + q_t A and
dA = sum_t dt_t q_t; dh0 = a_0 g_0; the reverse recurrence runs by the same doubling from the chunk's end
(_reverse_states). T sets the buffers' size, the levels and the number of carries kept; the result is the same up
to rounding.
The export (exported_scan, a symbolic n) runs a doubling scan over the whole sequence instead.
"""
from __future__ import annotations

import torch


def _prepare(dt_c, At, B_c, x_c, a, u):
    """a = exp(dt A) and u = (dt x) B into the buffers a, u [m, b, N, E] (inputs time-major [m, b, .], At = A
    transposed [N, E]); returns dt x [m, b, E]."""
    torch.exp(torch.mul(dt_c[:, :, None, :], At, out=a), out=a)
    dtx = dt_c * x_c
    torch.mul(B_c[..., None], dtx[:, :, None, :], out=u)
    return dtx


def _levels(m: int):
    """The doubling shifts 1, 2, 4, ... below m."""
    k = 1
    while k < m:
        yield k
        k *= 2


def _states(a, h, h_in, P, tmp):
    """h_t <- a_t h_{t-1} + h_t over the chunk in place, from h_in (None: zero), by doubling (Hillis-Steele) on pairs
    (P, h), P a copy of the decays (a is kept): level k adds P_t h_{t-k} to h_t and multiplies P_t by P_{t-k}, so
    that after ceil(log2 m) levels h_t = sum_{s <= t} (a_{s+1} .. a_t) u_s and P_t = a_0 .. a_t; then the carry,
    h_t += P_t h_in. Products of decays only (each at most 1: no exp(-S) to overflow). P, tmp: scratch buffers of
    a's shape. Returns the last state (a view)."""
    m = a.shape[0]
    P.copy_(a)
    for k in _levels(m):
        h[k:] += torch.mul(P[k:], h[:m - k], out=tmp[:m - k])
        if 2 * k < m or h_in is not None:  # the last level's products serve only the carry
            P[k:] = torch.mul(P[k:], P[:m - k], out=tmp[:m - k])
    if h_in is not None:
        h.addcmul_(P, h_in)
    return h[-1]


def _reverse_states(a, g, P, tmp):
    """g_t <- g_t + a_{t+1} g_{t+1} over the chunk in place (the reverse recurrence; g's last row already holds what
    comes from after the chunk), by the same doubling from the end: P_t starts as a_{t+1} (P's last row 1, never
    read), level k adds P_t g_{t+k} to g_t and multiplies P_t by P_{t+k}."""
    m = a.shape[0]
    P[:m - 1] = a[1:]
    P[m - 1].fill_(1)
    for k in _levels(m):
        g[:m - k] += torch.mul(P[:m - k], g[k:], out=tmp[:m - k])
        if 2 * k < m:
            P[:m - k] = torch.mul(P[:m - k], P[k:], out=tmp[:m - k])


def _buffers(x, T, N, k):
    b, _, E = x.shape
    return [x.new_empty(T, b, N, E) for _ in range(k)]


def _chunks(n, T):
    return [(s, min(s + T, n)) for s in range(0, n, T)]


def _chunk_inputs(ts, s, e):
    """Tokens s..e of each [b, n, .] input, time-major [m, b, .] (views: mamba.py gives x token-major, so every
    broadcast product reads its innermost dimension contiguously)."""
    return [t[:, s:e].transpose(0, 1) for t in ts]


def _forward(dt, A, B, C, x, h0, T: int, carries=None):
    """(y [b, n, E], the last state [b, N, E]) from h0 [b, N, E] or None; carries [m - 1, b, N, E] (or None)
    receives each later chunk's incoming state."""
    n = x.shape[1]
    y = torch.empty_like(x)
    a_buf, h_buf, p_buf, tmp_buf = _buffers(x, T, A.shape[1], 4)
    h, At = h0, A.t().contiguous()
    for i, (s, e) in enumerate(_chunks(n, T)):
        dt_c, B_c, C_c, x_c = _chunk_inputs((dt, B, C, x), s, e)
        a, hs = a_buf[:e - s], h_buf[:e - s]
        _prepare(dt_c, At, B_c, x_c, a, hs)
        h = _states(a, hs, h, p_buf[:e - s], tmp_buf[:e - s])
        y[:, s:e] = (C_c[:, :, None, :] @ hs).squeeze(-2).transpose(0, 1)
        if e < n:  # out of the buffers, which the next chunk overwrites
            h = h.clone() if carries is None else carries[i].copy_(h)
    return y, h.clone()


def _backward(dt, A, B, C, x, h0, carries, T, dy, g):
    """The gradients (dt, A, B, C, x, h0) from dy [b, n, E] (or None) and g, the last state's gradient [b, N, E]
    (or None); h0 and the carries [b, N, E]."""
    n = x.shape[1]
    ddt, dB, dC, dx = torch.empty_like(dt), torch.empty_like(B), torch.zeros_like(C), torch.empty_like(x)
    dAt, At = torch.zeros_like(A.t()), A.t().contiguous()
    a_buf, h_buf, g_buf, tmp_buf, p_buf = _buffers(x, T, A.shape[1], 5)
    chunks = _chunks(n, T)
    for i in reversed(range(len(chunks))):
        s, e = chunks[i]
        m, h_in = e - s, (h0 if i == 0 else carries[i - 1])
        dt_c, B_c, C_c, x_c = _chunk_inputs((dt, B, C, x), s, e)
        a, hs, gs, tmp = a_buf[:m], h_buf[:m], g_buf[:m], tmp_buf[:m]
        dtx = _prepare(dt_c, At, B_c, x_c, a, hs)
        _states(a, hs, h_in, gs, tmp)  # g's buffer as scratch: it is filled below
        if dy is None:
            gs.zero_()
        else:  # g_t starts as C_t dy_t; dC_t = dy_t . h_t
            dy_c = dy[:, s:e].transpose(0, 1)
            torch.mul(C_c[..., None], dy_c[:, :, None, :], out=gs)
            dC[:, s:e] = torch.mul(hs, dy_c[:, :, None, :], out=tmp).sum(-1).transpose(0, 1)
        if g is not None:
            gs[-1] += g
        _reverse_states(a, gs, p_buf[:m], tmp)
        dB[:, s:e] = torch.mul(gs, dtx[:, :, None, :], out=tmp).sum(-1).transpose(0, 1)
        gB = (B_c[:, :, None, :] @ gs).squeeze(-2)  # dL/d(dt x) [m, b, E]
        q = a.mul_(gs)  # a_t g_t: the gradient of h_{t-1}
        g = q[0].clone()
        q[1:].mul_(hs[:-1])  # q_t = a_t g_t h_{t-1}: dL/d(dt_t A)
        if h_in is None:
            q[0].zero_()
        else:
            q[0].mul_(h_in)
        dAt += torch.mul(q, dt_c[:, :, None, :], out=tmp).sum((0, 1))
        ddt[:, s:e] = torch.mul(q, At, out=tmp).sum(-2).addcmul_(gB, x_c).transpose(0, 1)
        dx[:, s:e] = (gB * dt_c).transpose(0, 1)
    return ddt, dAt.t(), dB, dC, dx, (None if h0 is None else g)


class _SelectiveScan(torch.autograd.Function):
    """selective_scan's training form: the forward keeps each later chunk's incoming state, the backward
    recomputes a chunk's states from it (_backward)."""

    @staticmethod
    def forward(ctx, dt, A, B, C, x, h0, T):
        b, n, E = x.shape
        carries = x.new_empty(len(_chunks(n, T)) - 1, b, A.shape[1], E)
        with torch.autocast(x.device.type, enabled=False):
            y, h = _forward(dt, A, B, C, x, h0, T, carries)
        ctx.save_for_backward(dt, A, B, C, x, h0, carries)
        ctx.T = T
        ctx.set_materialize_grads(False)
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        dt, A, B, C, x, h0, carries = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            return (*_backward(dt, A, B, C, x, h0, carries, ctx.T, dy, dh), None)


def selective_scan(dt, A, B, C, x, h0=None, chunk: int = 32):
    """The whole sequence, chunk by chunk: (y [b, n, E], the last state [b, E, N]) from h0 [b, E, N] or None, in
    the inputs' common dtype."""
    dtype = torch.promote_types(torch.promote_types(dt.dtype, A.dtype), torch.promote_types(B.dtype, x.dtype))
    dt, A, B, C, x = (t.to(torch.promote_types(dtype, C.dtype)) for t in (dt, A, B, C, x))
    h0 = None if h0 is None else h0.to(x.dtype).transpose(1, 2)  # [b, N, E] inside
    T = min(chunk, x.shape[1])
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (dt, A, B, C, x, h0)):
        y, h = _SelectiveScan.apply(dt, A, B, C, x, h0, T)
    else:
        y, h = _forward(dt, A, B, C, x, h0, T)
    return y, h.transpose(1, 2)


EXPORT_LEVELS = 16  # the export's doubling levels: exact for n <= 2^16


def exported_scan(dt, A, B, C, x):
    """The export's form (a symbolic n, no loop over chunks to trace): doubling over the whole sequence on pairs
    (decay, state), a_t <- a_t a_{t-k}, h_t <- h_t + a_t h_{t-k}, with products of decays (at most 1; no difference
    of cumulative sums to lose precision), EXPORT_LEVELS levels, the shifts gathered and masked (a shift past n
    reads nothing). O(n E N) at a fixed level count; (y [b, n, E], None)."""
    n = x.shape[1]
    a = (dt[..., None] * A).exp()
    h = (dt * x)[..., None] * B[:, :, None, :]
    pos = torch.arange(n, device=x.device)
    for j in range(EXPORT_LEVELS):
        k = 1 << j
        idx, keep = (pos - k).clamp(min=0), (pos >= k).to(x.dtype)[:, None, None]
        h = h + a * h.index_select(1, idx) * keep
        a = a * a.index_select(1, idx) * keep
    return (h @ C[..., None]).squeeze(-1), None
