"""The S4D kernel (Gu et al. 2022, arXiv:2206.11893), shared by ssm(s4d), ssm(h3) and ssm(bigs).

Per channel h and mode j < N/2 (the modes come in conjugate pairs: N/2 complex modes make N real states):
A_j = -exp(log_A_real) + i A_imag (S4D-Lin init: -1/2 + i pi j), dt = exp(log_dt) (log-uniform in [0.001, 0.1]),
zero-order hold dA = exp(dt A), B_bar = (exp(dt A) - 1) / A (B = 1, folded into C as S4D does: C~ = C B_bar),

    K_l = 2 Re(sum_j C~_j dA_j^l)        (the Vandermonde product, O(H N n)),

the impulse response of h_t = dA h_{t-1} + u_t, y_t = 2 Re(C~ . h_t). `channels` kernels share A and dt (a
bidirectional layer's forward and backward C). The step form: `advance` (the state after m more inputs) and
`from_state` (the outputs the state alone adds), both by the same Vandermonde, no loop over tokens.
"""
from __future__ import annotations

import math

import torch
from torch import nn


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
        """(dt A [H, M], C~ = C B_bar [channels, H, M]), complex."""
        A = torch.complex(-self.log_A_real.exp(), self.A_imag)
        dtA = self.log_dt.exp()[:, None] * A
        return dtA, torch.view_as_complex(self.C) * (dtA.exp() - 1) / A

    def forward(self, n) -> torch.Tensor:
        """K [channels, H, n] (real), in real arithmetic (ONNX has no complex exp): with dt A = a + i w and
        C~ = c_r + i c_i, K_l = 2 sum_j exp(a_j l) (c_r cos(w_j l) - c_i sin(w_j l)), one real [H, 2M, n] Vandermonde."""
        dt = self.log_dt.exp()[:, None]
        a, w, Ar = -dt * self.log_A_real.exp(), dt * self.A_imag, -self.log_A_real.exp()
        ea = a.exp()
        er, ei = ea * w.cos() - 1, ea * w.sin()  # exp(dt A) - 1
        den = Ar * Ar + self.A_imag * self.A_imag
        br, bi = (er * Ar + ei * self.A_imag) / den, (ei * Ar - er * self.A_imag) / den  # B_bar = (exp(dt A) - 1) / A
        cr, ci = self.C[..., 0], self.C[..., 1]
        Ct = torch.cat((cr * br - ci * bi, ci * br + cr * bi), -1)  # [c, H, 2M]: C~'s real and imaginary parts
        l = torch.arange(n, device=a.device, dtype=a.dtype)
        e, wl = (a[..., None] * l).exp(), w[..., None] * l  # [H, M, n]
        V = torch.cat((e * wl.cos(), -(e * wl.sin())), 1)  # [H, 2M, n]
        return 2 * torch.matmul(Ct.transpose(0, 1), V).transpose(0, 1)  # a MatMul in ONNX too (not an Einsum)

    def from_state(self, h: torch.Tensor, m: int) -> torch.Tensor:
        """What a state h [b, H, M] (complex) adds to the next m outputs: 2 Re(C~ . dA^(l+1) h), [b, H, m]."""
        dtA, Ct = self.discrete()
        V = (dtA[..., None] * torch.arange(1, m + 1, device=h.device, dtype=dtA.real.dtype)).exp()
        return 2 * torch.einsum("hm,bhm,hml->bhl", Ct[0], h, V).real

    def advance(self, h: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
        """The state after the inputs u [b, H, m] from h (None: zero): dA^m h + sum_l dA^(m-1-l) u_l."""
        dtA, _ = self.discrete()
        m = u.shape[-1]
        V = (dtA[..., None] * torch.arange(m - 1, -1, -1, device=u.device, dtype=dtA.real.dtype)).exp()
        new = torch.einsum("bhl,hml->bhm", u.to(V.dtype), V)
        return new if h is None else new + (dtA * m).exp() * h
