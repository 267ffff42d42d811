"""RWKV-4's WKV (rwkv4.py), chunked: per channel c, with the log-decay w = -exp(time_decay) <= 0 a step and the
bonus u = time_first,

    wkv_t = (a_{t-1} + e^{u + k_t} v_t) / (b_{t-1} + e^{u + k_t}),
    a_t = e^w a_{t-1} + e^{k_t} v_t,   b_t = e^w b_{t-1} + e^{k_t}

kept in log space as (num, den, mx) with a = e^mx num, b = e^mx den (HF's CPU path and the authors' kernel keep
the same running max, so that e^k never overflows). Over chunks of T tokens (a Python loop over chunks, never over
tokens): inside a chunk of L tokens the output at t weighs

    the carry (num, den) by  t w + mx,    token i < t by  (t - 1 - i) w + k_i,    token t by  u + k_t

a [L, L] table of log-weights per channel (-inf on and above the diagonal; token t's own term beside it); each row
is stabilised by its own max m_t (every term included), and (num_t, den_t) = exp(S - m) @ [v, 1] is one batched
matmul [b, C, L, L] @ [b, C, L, 2] (S shifted and exponentiated in place). The carry to the next
chunk weighs (num, den) by L w + mx and token i by (L - 1 - i) w + k_i, stabilised by their max (the new mx). The
maxima are constants to autograd (the result does not depend on them). O(n T C) for a fixed T; exact (every
exponent is <= 0).
"""
from __future__ import annotations

import torch


def chunk_wkv(w, u, k, v, state):
    """One chunk: w, u [C]; k, v [b, L, C]; state (num, den, mx) [b, C] each, or None (nothing before) ->
    (wkv [b, L, C], the state after the chunk)."""
    L = k.shape[1]
    pos = torch.arange(L, device=k.device, dtype=k.dtype)
    lag = pos[:, None] - 1 - pos[None, :]  # [t, i]: t - 1 - i, >= 0 below the diagonal
    table = (lag.clamp(min=0) * w[:, None, None]).masked_fill(lag < 0, float("-inf"))  # [C, t, i]
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # [b, C, L]
    own = u[:, None] + kt  # token t's own log-weight
    S = table + kt[:, :, None, :]  # [b, C, t, i]
    m = torch.maximum(S.detach().amax(-1), own.detach())  # [b, C, t]
    if state is not None:
        num, den, mx = state
        carry = pos * w[:, None] + mx[..., None]  # [b, C, t]
        m = torch.maximum(m, carry.detach())
    e = S.sub_(m[..., None]).exp_()
    nd = e @ torch.stack((vt, torch.ones_like(vt)), -1)  # [b, C, t, 2]
    eo = (own - m).exp()
    n_t, d_t = torch.addcmul(nd[..., 0], eo, vt), nd[..., 1] + eo
    if state is not None:
        c = (carry - m).exp()
        n_t, d_t = n_t + c * num[..., None], d_t + c * den[..., None]
    out = (n_t / d_t).transpose(1, 2)
    g = (L - 1 - pos) * w[:, None] + kt  # [b, C, i]: token i's weight at the chunk's end
    mx_new = g.detach().amax(-1)
    if state is not None:
        mx_new = torch.maximum(mx_new, (L * w + mx).detach())
    eg = (g - mx_new[..., None]).exp()
    num_new, den_new = (eg * vt).sum(-1), eg.sum(-1)
    if state is not None:
        c = (L * w + mx - mx_new).exp()
        num_new, den_new = num_new + c * num, den_new + c * den
    return out, (num_new, den_new, mx_new)


def wkv(w, u, k, v, state=None, chunk: int = 16):
    """The whole sequence chunk by chunk: (wkv [b, n, C], the last state). The inputs are split, not sliced (a
    slice's backward would write into a zero tensor of the whole length once per chunk)."""
    outs = []
    for k_c, v_c in zip(k.split(chunk, 1), v.split(chunk, 1)):
        o, state = chunk_wkv(w, u, k_c, v_c, state)
        outs.append(o)
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 1)), state
