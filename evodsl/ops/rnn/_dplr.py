"""The chunked kernel of the generalised delta rule, diagonal plus rank one (rnn(rwkv7)), and its token step.

Per head a state M [dk, dv] (RWKV-7's S transposed: o_t = r_t M_t), a log decay g_t <= 0 per key channel and two
key-wide vectors alpha_t, beta_t:

    M_t = (diag(exp(g_t)) + alpha_t beta_t^T) M_{t-1} + k_t v_t^T,        o_t = r_t^T M_t

The chunked form (the WY / UT transform of _chunked_delta.py generalised to a diagonal plus a rank one; fla's dplr
forms): in a chunk of C tokens, B_i the log decay summed up to token i (B_0 = 0), M the state before the chunk and
u_j = M_{j-1}^T beta_j what the rank-one part reads at token j,

    M_i = exp(B_i) M + sum_{j<=i} exp(B_i - B_j) (alpha_j u_j^T + k_j v_j^T)                 (per channel ratios)
    u_i = (exp(B_{i-1}) beta_i)^T M + sum_{j<i} [beta_i exp(B_{i-1} - B_j) . alpha_j] u_j + [... . k_j] v_j

one unit lower-triangular system (I - L_aa) U = L_ak V + diag-free (beta exp(B_{i-1})) M, so U = U_0 + W M with
[U_0, W] = (I - L_aa)^-1 [L_ak V, beta exp(B_{i-1})] (independent of M: solved for every chunk at once); then

    o_i = (r_i exp(B_i))^T M + sum_{j<=i} [r_i exp(B_i - B_j) . alpha_j] u_j + [... . k_j] v_j
    M'  = exp(B_C) M + sum_j exp(B_C - B_j) (alpha_j u_j^T + k_j v_j^T)

The per-channel ratios exp(B_i - B_j) are factorised as exp(B_i) exp(-B_j) (matmuls over channels, no [C, C, dk]
tensor): finite while C |g| stays below ln(max float) / 2 (RWKV-7's |g| <= e^-0.5 = 0.61: C up to 64 in float32).
A loop over the ceil(n / C) chunks only: O(n C dk + n dk dv) time. Tokens past n (the last chunk padded) have k = 0,
alpha = 0 and g = 0: they change neither the outputs nor the state.
"""
from __future__ import annotations

import torch

from ..attention._chunked_linear import _chunks


def chunked_dplr(r, k, v, g, alpha, beta, state=None, chunk: int = 16):
    """r, k, g, alpha, beta [b, h, n, dk], v [b, h, n, dv], the state before [b, h, dk, dv] or None (zero) ->
    (o [b, h, n, dv], the state after [b, h, dk, dv])."""
    b, h, n, dk = r.shape
    dv = v.shape[-1]
    C = min(chunk, n)
    pad = -n % C
    r, k, v, g, alpha, beta = (_chunks(t, C, pad) for t in (r, k, v, g, alpha, beta))  # [b, h, m, C, .]
    B = g.cumsum(3)
    up, down, before = B.exp(), (-B).exp(), (B - g).exp()  # exp(B_i), exp(-B_j), exp(B_{i-1})
    future = torch.ones(C, C, dtype=torch.bool, device=r.device).triu(1)
    rq, bq = r * up, beta * before
    ak, kk = alpha * down, k * down
    keys = torch.cat((ak, kk), -2)  # [., 2C, dk]
    rs, bs = rq @ keys.transpose(-1, -2), bq @ keys.transpose(-1, -2)  # [., C, 2C]
    r_a, r_k = rs.masked_fill(torch.cat((future, future), 1), 0.0).split(C, -1)  # j <= i
    b_a, b_k = bs.masked_fill(torch.cat((~future.T, ~future.T), 1), 0.0).split(C, -1)  # j < i
    eye = torch.eye(C, dtype=r.dtype, device=r.device)
    rhs = torch.cat((b_k @ v, bq), -1)
    work = torch.promote_types(rhs.dtype, torch.float32)  # no 16-bit triangular solve on CUDA
    solved = torch.linalg.solve_triangular((eye - b_a).to(work), rhs.to(work), upper=False, unitriangular=True)
    u0, w = solved.to(rhs.dtype).split((dv, dk), -1)
    out_v = r_k @ v  # the values' part of every output
    end = B[..., -1:, :]
    tail = (end - B).exp()  # exp(B_C - B_j)
    ends = torch.cat((alpha * tail, k * tail), -2).transpose(-1, -2)  # [., dk, 2C]
    carry = end.transpose(-1, -2).exp()  # [., dk, 1]
    s = r.new_zeros(b, h, dk, dv) if state is None else state
    out = []
    # a loop over chunks only, over tensors unbound once
    for u0c, wc, rqc, rac, ovc, endc, vc, cc in zip(u0.unbind(2), w.unbind(2), rq.unbind(2), r_a.unbind(2),
                                                    out_v.unbind(2), ends.unbind(2), v.unbind(2), carry.unbind(2)):
        u = u0c + wc @ s
        out.append(rqc @ s + rac @ u + ovc)
        s = cc * s + endc @ torch.cat((u, vc), -2)
    return torch.stack(out, 2).reshape(b, h, -1, dv)[:, :, :n], s


def recurrent_dplr(r, k, v, g, alpha, beta, state=None):
    """The recurrence itself, token by token (decoding): same arguments and result as chunked_dplr."""
    b, h, n, dk = r.shape
    s = r.new_zeros(b, h, dk, v.shape[-1]) if state is None else state
    out = []
    for t in range(n):
        u = beta[:, :, t, None, :] @ s  # [b, h, 1, dv]
        s = g[:, :, t, :, None].exp() * s + alpha[:, :, t, :, None] * u + k[:, :, t, :, None] * v[:, :, t, None, :]
        out.append((r[:, :, t, None, :] @ s).squeeze(2))
    return torch.stack(out, 2), s


def parallel_dplr(r, k, v, g, alpha, beta):
    """The same outputs from a zero state in one piece, no loop (the export's form, a symbolic n): the system of one
    chunk as long as the sequence with its per-channel ratios exp(B_i - B_j) as an [n, n, dk] tensor (no
    factorisation to overflow), the unit lower-triangular inverse as the product (I + L)(I + L^2)(I + L^4) ... of
    its strictly lower part L (nilpotent: exact once 2^k >= n; 16 factors, n up to 65536). O(n^2 dk) memory."""
    n = r.shape[2]
    future = torch.ones(n, n, dtype=torch.bool, device=r.device).triu(1)
    B = g.cumsum(2)
    diff = B[..., :, None, :] - B[..., None, :, :]  # [b, h, n, n, dk]: B_i - B_j
    incl = diff.masked_fill(future[..., None], float("-inf")).exp()  # j <= i
    excl = (diff - g[..., :, None, :]).masked_fill(~future.T[..., None], float("-inf")).exp()  # j < i: B_{i-1} - B_j
    r_a, r_k = (torch.einsum("bhic,bhijc,bhjc->bhij", r, incl, t) for t in (alpha, k))
    b_a, b_k = (torch.einsum("bhic,bhijc,bhjc->bhij", beta, excl, t) for t in (alpha, k))
    inverse, power = torch.eye(n, dtype=r.dtype, device=r.device) + b_a, b_a @ b_a
    for _ in range(15):
        inverse = inverse + inverse @ power
        power = power @ power
    return r_a @ (inverse @ (b_k @ v)) + r_k @ v
