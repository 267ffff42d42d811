"""The S4D kernel (Gu et al. 2022, arXiv:2206.11893), shared by ssm(s4d), ssm(h3) and ssm(bigs).

Per channel h and mode j < N/2 (the modes come in conjugate pairs: N/2 complex modes make N real states):
A_j = -exp(log_A_real) + i A_imag (S4D-Lin init: -1/2 + i pi j), dt = exp(log_dt) (log-uniform in [0.001, 0.1]),
zero-order hold dA = exp(dt A), B_bar = (exp(dt A) - 1) / A (B = 1, folded into C as S4D does: C~ = C B_bar),

    K_l = 2 Re(sum_j C~_j dA_j^l)        (the Vandermonde product, O(H N n)),

the impulse response of h_t = dA h_{t-1} + u_t, y_t = 2 Re(C~ . h_t). `channels` kernels share A and dt (a
bidirectional layer's forward and backward C). The step form: `advance` (the state after m more inputs) and
`from_state` (the outputs the state alone adds), both by the same Vandermonde, no loop over tokens.

By blocks of T = 2 ceil(sqrt(n)) lags (the S4D paper's O(N + L) space): with l = k T + t (t < T),
dA^l = dA^(kT) dA^t, so K[kT + t] = 2 Re(sum_j (C~_j dA_j^(kT)) dA_j^t): the whole blocks' coefficients C~ dA^(kT)
[H, floor(n/T), M] times the first block's Vandermonde [H, M, T], one batched matmul, and the last block's r < T
lags by a second (4 H M n FLOPs in all, as the one-shot product); nothing of size n x M exists, in the forward or
in autograd's backward (which keeps the factors, O(H M sqrt(n)), and recomputes nothing). Each power is
exp(a l) (cos, sin)(w l) of its own lag, as the one-shot form computes it: no error accumulates over blocks (in
float32 at n = 64k the error equals the one-shot form's). An export (or a symbolic n) runs one block of n lags:
the one-shot product, in real arithmetic. H M n time, H M sqrt(n) + c H n memory.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def block_of(n) -> int | None:
    """T, the lags a block: 2 ceil(sqrt(n)) (the block's Vandermonde and the blocks' coefficients, H M T and
    c H M n / T elements, balanced; measured fastest near it); None (one block of n lags) when n is symbolic or
    exported."""
    if not isinstance(n, int) or torch.compiler.is_exporting():
        return None
    return 2 * (math.isqrt(n - 1) + 1) if n > 0 else 1


def powers(a: torch.Tensor, w: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """exp((a + i w) l) as [H, 2M, len(l)] reals, (Re, -Im) interleaved by mode: exp(a l) cos(w l), -exp(a l) sin(w l);
    a, w [H, M]."""
    e, wl = (a[..., None] * l).exp(), w[..., None] * l
    return torch.stack((e * wl.cos(), -(e * wl.sin())), 2).flatten(1, 2)


def complex_powers(a: torch.Tensor, w: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """exp((a + i w) l) [H, M, len(l)] complex, from real exp, cos and sin (torch's complex exp is some 30 times
    slower on a CPU)."""
    e, wl = (a[..., None] * l).exp(), w[..., None] * l
    return torch.complex(e * wl.cos(), e * wl.sin())


def vandermonde(a: torch.Tensor, w: torch.Tensor, cr: torch.Tensor, ci: torch.Tensor, n) -> torch.Tensor:
    """2 Re(sum_j (cr + i ci)_j exp((a + i w)_j l)) for l < n, [c, H, n]: a, w [H, M] (dt A's real and imaginary
    parts), cr, ci [c, H, M]; by blocks of block_of(n) lags, in real arithmetic when in one block (an export: ONNX
    has no complex exp). Re(C~ dA^l) = c_r Re(dA^l) + c_i (-Im(dA^l)): (c_r, c_i) interleaved times powers()."""
    T = block_of(n)
    V = powers(a, w, torch.arange(n if T is None else T, device=a.device, dtype=a.dtype))  # [H, 2M, T]: dA^t
    if T is None:  # one block: the coefficients are C~ itself
        Ct = torch.stack((cr, ci), -1).flatten(2)  # [c, H, 2M]
        return 2 * torch.matmul(Ct.transpose(0, 1), V).transpose(0, 1)  # a MatMul in ONNX too (not an Einsum)
    H, M, c, (nf, r) = a.shape[0], a.shape[1], cr.shape[0], divmod(n, T)  # nf whole blocks, then r lags
    P = complex_powers(a, w, torch.arange(0, n, T, device=a.device, dtype=a.dtype))  # dA^(kT) [H, M, nb]
    Ct = torch.complex(2 * cr, 2 * ci).transpose(0, 1)  # 2 C~ [H, c, M]
    K = []
    if nf:  # the whole blocks' coefficients 2 C~ dA^(kT), (Re, Im) by mode, times V: [H, c, nf T]
        Cb = torch.view_as_real(Ct[:, :, None] * P[..., :nf].transpose(1, 2)[:, None]).reshape(H, c * nf, 2 * M)
        K.append(torch.matmul(Cb, V).reshape(H, c, nf * T))
    if r:  # the last block's r lags
        K.append(torch.matmul(torch.view_as_real(Ct * P[:, None, :, nf]).reshape(H, c, 2 * M), V[..., :r]))
    return (K[0] if len(K) == 1 else torch.cat(K, -1)).transpose(0, 1)


class DiagonalKernel(nn.Module):
    def __init__(self, H: int, N: int, channels: int = 1):
        super().__init__()
        M = N // 2
        self.H, self.M, self.channels = H, M, channels
        dt = torch.rand(H) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)
        self.log_dt = nn.Parameter(dt)
        self.log_A_real = nn.Parameter(torch.full((H, M), math.log(0.5)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(M, dtype=torch.float32).repeat(H, 1))
        self.C = nn.Parameter(torch.randn(channels, H, M, 2) * 0.5 ** 0.5)  # complex, as (re, im) pairs

    def discrete(self):
        """(a, w, c_r, c_i): dt A = a + i w [H, M] and C~ = C B_bar = c_r + i c_i [channels, H, M], in real
        arithmetic (ONNX has no complex exp)."""
        dt = self.log_dt.exp()[:, None]
        a, w, Ar = -dt * self.log_A_real.exp(), dt * self.A_imag, -self.log_A_real.exp()
        ea = a.exp()
        er, ei = ea * w.cos() - 1, ea * w.sin()  # exp(dt A) - 1
        den = Ar * Ar + self.A_imag * self.A_imag
        br, bi = (er * Ar + ei * self.A_imag) / den, (ei * Ar - er * self.A_imag) / den  # B_bar = (exp(dt A) - 1) / A
        cr, ci = self.C[..., 0], self.C[..., 1]
        return a, w, cr * br - ci * bi, ci * br + cr * bi

    def forward(self, n) -> torch.Tensor:
        """K [channels, H, n] (real): with dt A = a + i w and C~ = c_r + i c_i,
        K_l = 2 sum_j exp(a_j l) (c_r cos(w_j l) - c_i sin(w_j l)), by blocks of lags (vandermonde)."""
        return vandermonde(*self.discrete(), n)

    def from_state(self, h: torch.Tensor, m: int) -> torch.Tensor:
        """What a state h [b, H, M] (complex) adds to the next m outputs: 2 Re(C~ . dA^(l+1) h), [b, H, m], the
        Vandermonde product with the coefficients C~ dA h."""
        a, w, cr, ci = self.discrete()
        one = torch.ones(1, device=h.device, dtype=a.dtype)
        q = torch.complex(cr[0], ci[0]) * complex_powers(a, w, one)[..., 0] * h
        return vandermonde(a, w, q.real, q.imag, m)

    def advance(self, h: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
        """The state after the inputs u [b, H, m] from h (None: zero): dA^m h + sum_r dA^r u_(m-1-r), by blocks of
        T lags r = k T + t: sum_k dA^(kT) sum_t dA^t u_(m-1-kT-t)."""
        a, w, _, _ = self.discrete()
        b, H, m = u.shape
        T = block_of(m) or m
        nb = -(-m // T)
        V = complex_powers(a, w, torch.arange(T, device=u.device, dtype=a.dtype))  # [H, M, T]
        ur = torch.nn.functional.pad(u.flip(-1), (0, nb * T - m)).reshape(b, H, nb, T).to(V.dtype)
        P = complex_powers(a, w, torch.arange(0, nb * T, T, device=u.device, dtype=a.dtype))  # [H, M, nb]
        new = (torch.einsum("bhkt,hmt->bhkm", ur, V) * P.transpose(1, 2)).sum(2)
        if h is None:
            return new
        return new + complex_powers(a, w, torch.full((1,), m, device=u.device, dtype=a.dtype))[..., 0] * h
