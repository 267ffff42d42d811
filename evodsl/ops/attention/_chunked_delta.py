"""The chunked kernel of the (gated) delta rule (DeltaNet, Gated DeltaNet), shared by those variants, and its
recurrent step.

Per head, a state S_t [dk, dv] (the papers' transposed: o_t = q_t^T S_t), a write strength beta_t in (0, 1) and a
log decay g_t <= 0 (a_t = exp(g_t); g = 0 for DeltaNet):

    S_t = a_t (I - beta_t k_t k_t^T) S_(t-1) + beta_t k_t v_t^T,        o_t = q_t^T S_t

The chunked form (Yang et al. 2024, arXiv:2406.06484 section 3, the WY / UT transform; Yang, Kautz, Hatamizadeh
2024, arXiv:2412.06464 section 3.3 with the gate): in a chunk of C tokens, B_i the log decay accumulated up to
token i, Gamma_ij = exp(B_i - B_j) (j <= i), and S the state before the chunk, the new values written,
u_i = beta_i (v_i - exp(B_i) k_i^T S - sum_{j<i} Gamma_ij (k_i^T k_j) u_j), solve one unit lower-triangular system

    (I + strict_lower(diag(beta) (K K^T * Gamma))) U = diag(beta) (V - diag(exp(B)) K S),   so  U = U_0 - W S
    with T = (I + ...)^-1:  U_0 = T diag(beta) V,   W = T diag(beta exp(B)) K          (independent of S)

    o_i = exp(B_i) q_i^T S + sum_{j<=i} Gamma_ij (q_i^T k_j) u_j,      S' = exp(B_C) S + sum_j exp(B_C - B_j) k_j u_j^T

T's system is solved for every chunk at once (torch.linalg.solve_triangular on [C, C] blocks); the loop over the
ceil(n / C) chunks carries S and forms U = U_0 - W S, the outputs and the next state: O(n C (dk + dv) + n dk dv)
time, no n x n tensor. Every decay factor is a ratio at most 1. Tokens past n (the last chunk padded) have k = 0,
beta = 0 and g = 0: they change neither the outputs nor the state.
"""
from __future__ import annotations

import torch

from ._chunked_linear import _chunks


def chunked_delta(q, k, v, beta, g=None, state=None, chunk: int = 64):
    """q, k [b, h, n, dk], v [b, h, n, dv], beta [b, h, n], g [b, h, n] or None (no decay), the state before
    [b, h, dk, dv] or None (zero) -> (o [b, h, n, dv], the state after [b, h, dk, dv])."""
    b, h, n, dk = q.shape
    C = min(chunk, n)
    pad = -n % C
    q, k, v, beta = (_chunks(t, C, pad) for t in (q, k, v, beta))  # [b, h, m, C, ...]
    future = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
    if g is None:
        gamma = decay = ratio = None
    else:
        B = _chunks(g, C, pad).cumsum(3)
        ratio = (B[..., :, None] - B[..., None, :]).masked_fill(future, float("-inf")).exp()  # Gamma [.., C, C]
        gamma, decay = B.exp()[..., None], (B[..., -1:] - B).exp()[..., None]  # exp(B_i), exp(B_C - B_j)
    kk = k @ k.transpose(-1, -2)
    kk = kk if ratio is None else kk * ratio
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    lower = eye + (beta[..., None] * kk).masked_fill(~future.T, 0.0)  # unit lower-triangular
    rhs = torch.cat((beta[..., None] * v, beta[..., None] * (k if gamma is None else gamma * k)), -1)
    work = torch.promote_types(rhs.dtype, torch.float32)  # no 16-bit triangular solve on CUDA: float32 (a no-op at
    # float32 and float64), back to the inputs' dtype for the loop's matmuls
    solved = torch.linalg.solve_triangular(lower.to(work), rhs.to(work), upper=False, unitriangular=True).to(rhs.dtype)
    u0, w = solved.split((v.shape[-1], dk), -1)
    qk = (q @ k.transpose(-1, -2)).masked_fill(future, 0.0)
    qk = qk if ratio is None else qk * ratio
    qs = q if gamma is None else gamma * q
    kc = k if decay is None else decay * k
    s = q.new_zeros(b, h, dk, v.shape[-1]) if state is None else state
    out = []
    carry = [None] * q.shape[2] if g is None else B[..., -1, None, None].exp().unbind(2)
    # a loop over chunks only, over tensors unbound once (indexing chunk c would give each chunk's gradient the
    # size of all of them)
    for u0c, wc, qc, qkc, kcc, keep in zip(u0.unbind(2), w.unbind(2), qs.unbind(2), qk.unbind(2), kc.unbind(2), carry):
        u = u0c - wc @ s
        out.append(qc @ s + qkc @ u)
        s = (s if keep is None else keep * s) + kcc.transpose(-1, -2) @ u
    return torch.stack(out, 2).reshape(b, h, -1, v.shape[-1])[:, :, :n], s


def recurrent_delta(q, k, v, beta, g=None, state=None):
    """The recurrence itself, token by token (decoding): same arguments and result as chunked_delta."""
    b, h, n, dk = q.shape
    s = q.new_zeros(b, h, dk, v.shape[-1]) if state is None else state
    out = []
    for t in range(n):
        kt, bt = k[:, :, t, :, None], beta[:, :, t, None, None]
        if g is not None:
            s = g[:, :, t, None, None].exp() * s
        s = s - bt * kt @ (kt.transpose(-1, -2) @ s) + bt * kt * v[:, :, t, None, :]
        out.append((q[:, :, t, None, :] @ s).squeeze(2))
    return torch.stack(out, 2), s


def parallel_delta(q, k, v, beta, g=None):
    """The same outputs from a zero state in one piece, no loop (the export's form, a symbolic n): the system of
    one chunk as long as the sequence, its unit lower-triangular [n, n] inverse as the product (I - N)(I + N^2)
    (I + N^4) ... of the strictly lower part N (nilpotent: exact once 2^k >= n; 16 factors, n up to 65536)."""
    n = q.shape[2]
    future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    qk, kk = (q @ k.transpose(-1, -2)).masked_fill(future, 0.0), k @ k.transpose(-1, -2)
    if g is not None:
        B = g.cumsum(2)
        ratio = (B[..., :, None] - B[..., None, :]).masked_fill(future, float("-inf")).exp()
        qk, kk = qk * ratio, kk * ratio
    N = (beta[..., None] * kk).masked_fill(~future.T, 0.0)
    inverse, power = torch.eye(n, dtype=q.dtype, device=q.device) - N, N @ N
    for _ in range(15):
        inverse = inverse + inverse @ power
        power = power @ power
    return qk @ (inverse @ (beta[..., None] * v))
