"""The selective scan of ssm(mamba) (mamba.py): per channel e and state n,

    h_t = a_t h_{t-1} + u_t,      a_t = exp(dt_t A),      u_t = dt_t x_t B_t,      y_t = C_t . h_t

Training and prefill (selective_scan): an autograd Function over chunks of T tokens. The states [b, n, E, N] never
exist for the whole sequence at once: a chunk's decays a and inputs u go into [T, b, E, N] buffers made once, and
its states are written over u token by token (one multiply-add of [b, E, N] a token; no exp(-S) that could
overflow, no division), then y = h C for the chunk (a batched matmul). The forward keeps only each chunk's
incoming state (the carry). The backward walks the chunks in reverse: it recomputes a chunk's states from its
carry, runs the reverse recurrence (Martin and Cundy 2018, arXiv:1709.04057, Section 3)

    g_t = C_t dy_t + a_{t+1} g_{t+1}      (g after the chunk's last token: the next chunk's a_0 g_0, or the
                                           last state's gradient)

and forms the gradients in closed form: du_t = g_t, so dx_t = dt_t (g_t B_t), dB_t = (dt_t x_t) . g_t;
dC_t = dy_t . h_t; with q_t = a_t g_t h_{t-1} (the decay's share), ddt_t = x_t (g_t B_t) + q_t A and
dA = sum_t dt_t q_t; dh0 = a_0 g_0. Every token runs the same arithmetic at every T: T sets the buffers' size
and the number of carries kept, not the result (the chunk loops over tokens: measured on one CPU thread, a
doubling scan's log2 T passes over the chunk cost more than its T steps; benchmarks/bench_recurrent.py).
The export (exported_scan, a symbolic n) runs a doubling scan over the whole sequence instead.
"""
from __future__ import annotations

import torch


def _prepare(dt_c, A, B_c, x_c, a, u):
    """a = exp(dt A) and u = (dt x) B into the buffers a, u [m, b, E, N] (inputs time-major [m, b, .]); dt x."""
    torch.mul(dt_c[..., None], A, out=a).exp_()
    dtx = dt_c * x_c
    torch.mul(dtx[..., None], B_c[:, :, None, :], out=u)
    return dtx


def _states(a, h, h_in):
    """h_t <- a_t h_{t-1} + h_t in place, token by token from h_in (None: zero); the last state (a view)."""
    for a_t, h_t in zip(a, h):
        if h_in is not None:
            h_t.addcmul_(a_t, h_in)
        h_in = h_t
    return h_in


def _forward(dt, A, B, C, x, h0, chunk: int, carries=None):
    """(y [b, n, E], the last state [b, E, N]); carries [m - 1, b, E, N] (or None) receives each later chunk's
    incoming state."""
    b, n, E = x.shape
    N = A.shape[1]
    y = x.new_empty(b, n, E)
    T = min(chunk, n)
    a_buf, h_buf = x.new_empty(T, b, E, N), x.new_empty(T, b, E, N)
    h = h0
    for i, s in enumerate(range(0, n, T)):
        e = min(s + T, n)
        dt_c, B_c, C_c, x_c = (t[:, s:e].transpose(0, 1) for t in (dt, B, C, x))
        a, hs = a_buf[:e - s], h_buf[:e - s]
        _prepare(dt_c, A, B_c, x_c, a, hs)
        h = _states(a, hs, h)
        y[:, s:e] = (hs @ C_c[..., None]).squeeze(-1).transpose(0, 1)
        if e < n:  # out of the buffers, which the next chunk overwrites
            h = h.clone() if carries is None else carries[i].copy_(h)
    return y, h.clone()


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dt, A, B, C, x, h0, chunk):
        b, n, E = x.shape
        T = min(chunk, n)
        carries = x.new_empty(-(-n // T) - 1, b, E, A.shape[1])
        with torch.autocast(x.device.type, enabled=False):
            y, h = _forward(dt, A, B, C, x, h0, T, carries)
        ctx.save_for_backward(dt, A, B, C, x, h0, carries)
        ctx.chunk = T
        ctx.set_materialize_grads(False)
        return y, h

    @staticmethod
    def backward(ctx, dy, dh_last):
        dt, A, B, C, x, h0, carries = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            return (*_backward(dt, A, B, C, x, h0, carries, ctx.chunk, dy, dh_last), None)


def _backward(dt, A, B, C, x, h0, carries, T, dy, g):
    """The gradients (dt, A, B, C, x, h0) from dy [b, n, E] (or None) and g, the last state's gradient (or None)."""
    b, n, E = x.shape
    N = A.shape[1]
    ddt, dB, dC, dx = torch.empty_like(dt), torch.empty_like(B), torch.zeros_like(C), torch.empty_like(x)
    dA = torch.zeros_like(A)
    a_buf, h_buf, g_buf = (x.new_empty(T, b, E, N) for _ in range(3))
    starts = list(range(0, n, T))
    for i in reversed(range(len(starts))):
        s = starts[i]
        e = min(s + T, n)
        m = e - s
        h_in = h0 if i == 0 else carries[i - 1]
        dt_c, B_c, C_c, x_c = (t[:, s:e].transpose(0, 1) for t in (dt, B, C, x))
        a, hs, gs = a_buf[:m], h_buf[:m], g_buf[:m]
        dtx = _prepare(dt_c, A, B_c, x_c, a, hs)
        _states(a, hs, h_in)
        if dy is None:
            gs.zero_()
        else:
            dy_c = dy[:, s:e].transpose(0, 1)
            torch.mul(dy_c[..., None], C_c[:, :, None, :], out=gs)
            dC[:, s:e] = (dy_c[:, :, None, :] @ hs).squeeze(-2).transpose(0, 1)
        if g is not None:
            gs[-1] += g
        for t in range(m - 2, -1, -1):
            gs[t].addcmul_(a[t + 1], gs[t + 1])
        dB[:, s:e] = (dtx[:, :, None, :] @ gs).squeeze(-2).transpose(0, 1)
        gB = (gs @ B_c[..., None]).squeeze(-1)  # dL/d(dt x) [m, b, E]
        q = a.mul_(gs)  # a_t g_t: the gradient of h_{t-1} through the decay
        g = q[0].clone()
        q[1:].mul_(hs[:-1])
        if h_in is None:
            q[0].zero_()
        else:
            q[0].mul_(h_in)
        dA += torch.einsum("tbe,tben->en", dt_c, q)
        ddt[:, s:e] = (gB * x_c + q.mul_(A).sum(-1)).transpose(0, 1)
        dx[:, s:e] = (gB * dt_c).transpose(0, 1)
    return ddt, dA, dB, dC, dx, (None if h0 is None else g)


def selective_scan(dt, A, B, C, x, h0=None, chunk: int = 32):
    """The whole sequence, chunk by chunk: (y [b, n, E], the last state [b, E, N]), in the inputs' common dtype."""
    dtype = torch.promote_types(torch.promote_types(dt.dtype, A.dtype), torch.promote_types(B.dtype, x.dtype))
    dtype = torch.promote_types(dtype, C.dtype)
    dt, A, B, C, x = (t.to(dtype) for t in (dt, A, B, C, x))
    h0 = None if h0 is None else h0.to(dtype)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (dt, A, B, C, x, h0)):
        return _SelectiveScan.apply(dt, A, B, C, x, h0, chunk)
    return _forward(dt, A, B, C, x, h0, chunk)


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
