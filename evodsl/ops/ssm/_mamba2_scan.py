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


def ssd_export(x, dt, A, B, C, chunk: int):
    """The export's form (a symbolic n: no loop over chunks to trace), Mamba-2's SSD with every chunk at once: the
    sequence extended to m chunks of T (a position past n has dt = 0: decay 1, no input), the intra-chunk
    quadratic form batched over chunks, each chunk's own final state, then the states entering the chunks from an
    [m, m] mask of the chunk decays (the paper's listing 1: O(m^2 H P N), m = n / T), and their reading.
    O(n T (N + P) H + (n / T)^2 H P N) in place of one chunk's O(n^2 H); (y [b, n, H, P], None)."""
    b, n, H, P = x.shape
    N, T = B.shape[-1], chunk
    # m = n // T + 2 chunks: enough at every n, and never one (a traced size-1 dim would specialise); the positions
    # gathered as [m, T] (clamped, those past n masked) rather than padded and reshaped, and the outputs gathered
    # back, so that no shape relation between n and m T needs a guard in the traced graph
    m = n // T + 2
    pos = torch.arange(m, device=x.device)[:, None] * T + torch.arange(T, device=x.device)  # [m, T]
    src, past = pos.clamp(max=n - 1), pos >= n
    xdt = (x * dt[..., None])[:, src].permute(0, 3, 1, 2, 4).masked_fill(past[:, :, None], 0.0)  # [b, H, m, T, P]
    Bc, Cc = (t[:, src].permute(0, 3, 1, 2, 4) for t in (B, C))  # [b, H, m, T, N]
    S = (dt * A)[:, src].permute(0, 3, 1, 2).masked_fill(past, 0.0).cumsum(-1)  # [b, H, m, T]
    above = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
    L = (S[..., :, None] - S[..., None, :]).masked_fill(above, float("-inf")).exp()  # [b, H, m, T, T]
    y = ((Cc @ Bc.transpose(-1, -2)) * L) @ xdt  # [b, H, m, T, P]
    last = S[..., -1]  # [b, H, m]: each chunk's total log-decay
    own = (xdt * (last[..., None] - S).exp()[..., None]).transpose(-1, -2) @ Bc  # [b, H, m, P, N]
    # the state entering chunk c: sum over chunks j < c of exp(sum of the decays of chunks j+1 .. c-1) own_j
    cum = last.cumsum(-1)  # [b, H, m]
    seg = (cum[..., :, None] - last[..., :, None]) - cum[..., None, :]  # [b, H, c, j]: decays of j+1 .. c-1
    before = torch.ones_like(seg, dtype=torch.bool).triu(0)  # j >= c: not before chunk c
    W = seg.masked_fill(before, float("-inf")).exp()
    h_in = (W @ own.flatten(-2)).unflatten(-1, (P, N))  # [b, H, m, P, N]
    y = y + (Cc @ h_in.transpose(-1, -2)) * S.exp()[..., None]
    return y.permute(0, 2, 3, 1, 4).flatten(1, 2).index_select(1, torch.arange(n, device=x.device)), None
