"""The selective scan of ssm(mamba) (mamba.py), chunked: per channel e and state n,

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,      y_t = C_t . h_t

over chunks of T tokens (a Python loop over chunks, never over tokens). Inside a chunk, with the cumulative
log-decays S_t = sum_{s <= t} dt_s A (per e, n; S_t - S_s <= 0 for s <= t, so every factor below is at most 1),

    h_t = sum_{s <= t} exp(S_t - S_s) u_s,      u_s = dt_s B_s x_s, and u_0 += exp(S_0) h_prev (the carry)

summed by doubling (Hillis-Steele): after level j, h_t holds the terms s in (t - 2^j, t]; level j adds
exp(S_t - S_{t - 2^j}) h_{t - 2^j}. log2(T) levels of [b, T, E, N] multiply-adds: O(n E N log T) = O(n E N) for a
fixed T, exact (no exp(-S) that could overflow as the cumsum form's would). y_t = h_t C_t is a batched matmul.

Training keeps no chunk's inner states: each chunk runs under activation checkpointing (torch.utils.checkpoint,
non-reentrant), which keeps its inputs (views of the whole-sequence dt, B, C, x, kept anyway) and its incoming
carry, and recomputes the chunk's levels in backward, one chunk at a time. Kept for the scan: a [b, E, N] carry a
chunk, in place of (2 L + 1) states a token (L = log2 T levels): 11 n E N numbers at T = 32.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def levels(T: int) -> list:
    """The doubling shifts 1, 2, 4, ... below T."""
    out, k = [], 1
    while k < T:
        out.append(k)
        k *= 2
    return out


def chunk_scan(dt, A, B, C, x, h0):
    """One chunk: dt, x [b, T, E], A [E, N], B, C [b, T, N], h0 [b, E, N] or None -> (y [b, T, E], h_T [b, E, N])."""
    S = (dt[..., None] * A).cumsum(1)  # [b, T, E, N]
    h = (dt * x)[..., None] * B[:, :, None, :]
    if h0 is not None:
        h[:, 0].add_(S[:, 0].exp() * h0)
    for k in levels(h.shape[1]):
        h = torch.cat((h[:, :k], h[:, k:] + (S[:, k:] - S[:, :-k]).exp() * h[:, :-k]), 1)
    y = (h @ C[..., None]).squeeze(-1)
    return y, h[:, -1].clone()  # not a view: the chunk's states die with it (inference)


def selective_scan(dt, A, B, C, x, h0=None, chunk: int = 32):
    """The whole sequence, chunk by chunk: (y [b, n, E], the last state [b, E, N]). The inputs are split, not
    sliced (a slice's backward writes into a zero tensor of the whole length, once per chunk: quadratic)."""
    ys = []
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (dt, A, B, C, x))
    for dt_c, B_c, C_c, x_c in zip(*(t.split(chunk, 1) for t in (dt, B, C, x))):
        if recompute:
            y, h0 = checkpoint(chunk_scan, dt_c, A, B_c, C_c, x_c, h0, use_reentrant=False)
        else:
            y, h0 = chunk_scan(dt_c, A, B_c, C_c, x_c, h0)
        ys.append(y)
    return (ys[0] if len(ys) == 1 else torch.cat(ys, 1)), h0


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
