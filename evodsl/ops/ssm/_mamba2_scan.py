"""The SSD scan of ssm(mamba2) (mamba2.py): per head, a scalar decay a_t = dt_t A and

    h_t = exp(a_t) h_{t-1} + dt_t x_t B_t^T      [P, N] per head,      y_t = h_t C_t

over chunks of T tokens (a Python loop over chunks). Inside a chunk, with S_t = sum_{s <= t} a_s (cumulative
log-decays; S_t - S_s <= 0 for s <= t) and L[t, s] = exp(S_t - S_s) for s <= t, 0 above (Mamba-2's 1-semiseparable
mask), the quadratic (attention-like) form

    Y = (C B^T . L) (dt x)  +  exp(S_t) C_t h_prev          (intra-chunk, then the state carried in)
    h_T = sum_s exp(S_T - S_s) (dt_s x_s)^T B_s + exp(S_T) h_prev

all batched matmuls: O(n T (N + P) + n N P) per head, linear in n for the fixed T. B and C are shared by the
H / G heads of a group (repeated to the heads, as HF's torch_forward).
"""
from __future__ import annotations

import torch


def ssd_chunk(x, dt, A, B, C, h0):
    """x [b, T, H, P], dt [b, T, H], A [H], B, C [b, T, H, N], h0 [b, H, P, N] or None ->
    (y [b, T, H, P], h_T [b, H, P, N])."""
    T = x.shape[1]
    S = (dt * A).cumsum(1).transpose(1, 2)  # [b, H, T]
    seg = S[..., :, None] - S[..., None, :]  # [b, H, T, T]: S_t - S_s
    above = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
    L = seg.masked_fill(above, float("-inf")).exp()
    Cb, Bb = C.transpose(1, 2), B.transpose(1, 2)  # [b, H, T, N]
    xdt = (x * dt[..., None]).transpose(1, 2)  # [b, H, T, P]
    y = ((Cb @ Bb.transpose(-1, -2)) * L) @ xdt
    last = S[..., -1:]  # [b, H, 1]
    w = (last - S).exp()  # exp(S_T - S_s)
    h = (xdt * w[..., None]).transpose(-1, -2) @ Bb  # [b, H, P, N]
    if h0 is not None:
        y = y + (Cb @ h0.transpose(-1, -2)) * S.exp()[..., None]
        h = h + last.exp()[..., None] * h0
    return y.transpose(1, 2), h


def ssd_scan(x, dt, A, B, C, h0=None, chunk: int = 64):
    """The whole sequence, chunk by chunk (inputs split, not sliced: linear backward): (y, the last state)."""
    ys = []
    for x_c, dt_c, B_c, C_c in zip(*(t.split(chunk, 1) for t in (x, dt, B, C))):
        y, h0 = ssd_chunk(x_c, dt_c, A, B_c, C_c, h0)
        ys.append(y)
    return (ys[0] if len(ys) == 1 else torch.cat(ys, 1)), h0
