"""ssm(s5, P=64, blocks=1): the S5 layer (Smith, Warrington and Linderman 2023, "Simplified State Space Layers for
Sequence Modeling", arXiv:2208.04933, Sections 3 and 4), a MIMO diagonal SSM on features u [b, n, d] (H = d):

    Lambda = -exp(lambda_log) + i lambda_im                    [P] complex, Re < 0 (so |Lambda_bar| < 1)
    Delta  = exp(log_step)                                     [P] learned timescales, log-uniform in [dt_min, dt_max]
    Lambda_bar = exp(Lambda Delta),   B_bar = ((Lambda_bar - 1) / Lambda) . B~      zero-order hold
    x_t    = Lambda_bar . x_{t-1} + B_bar u_t                  B~ [P, d] complex
    y_t    = Re(C~ x_t) + D . u_t                              C~ [d, P] complex, D [d] real

Initialisation (the paper's block-diagonal HiPPO-N, Section 4.3 and its code): the normal part of HiPPO-LegS of size
P / blocks, S = A_LegS + p p^T (p_n = sqrt(n + 1/2)), is -1/2 I plus a skew-symmetric matrix; Lambda = -1/2 + i
eig(-i S_skew) with eigenvectors V, repeated over `blocks` blocks (V block-diagonal); B~ = V^H B and C~ = C V with
B [P, d] Lecun-normal (std d^-1/2), C [d, P] complex Gaussian (std P^-1/2 over both parts), D standard normal.
Choices where the paper is silent or differs by option: all P eigenvalues are kept (no conjugate-symmetric half
with 2 Re(.)); Re(Lambda) is kept negative by its parametrisation -exp(.) where the paper's code clips it; one
timescale per state. The recurrence and readout are _complex_diagonal.py's (shared with ssm(lru)); the paper's
block (norm, GELU or a GLU, residual) is the spec's. Training runs the chunked doubling scan (rnn/_diag_scan.py,
the parallel scan of the paper); decoding the step, from the complex state x [P] (2 P reals). Causal only here.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from ..registry import Op, OpEnv, OpParams, ShapeProblem, register
from ._complex_diagonal import ComplexDiagonalSSM, causal_only_shape
from ._complex_diagonal_cost import complex_diagonal_cost


class S5Params(OpParams):
    P: int = Field(64, ge=1, le=4096, description="the complex state size")
    blocks: int = Field(1, ge=1, le=4096, description="J: HiPPO-N blocks of P / J states at init")
    dt_min: float = Field(0.001, gt=0.0, le=1.0, description="the timescales' lower end at init")
    dt_max: float = Field(0.1, gt=0.0, le=10.0, description="the timescales' upper end at init")
    chunk: int = Field(64, ge=1, le=4096, description="T: tokens per chunk of the scan (the result is the same)")


def s5_shape(p: S5Params, env: OpEnv):
    shape = causal_only_shape("s5")(p, env)
    if p.P % p.blocks:
        raise ShapeProblem(f"P={p.P} is not a multiple of blocks={p.blocks}", "blocks", "give P divisible by blocks")
    if p.dt_min >= p.dt_max:
        raise ShapeProblem(f"dt_min={p.dt_min} is not below dt_max={p.dt_max}", "dt_min", "give dt_min < dt_max")
    return shape


def hippo_n(N: int):
    """(Lambda [N] complex, V [N, N] complex): the diagonalised normal part of HiPPO-LegS."""
    q = torch.sqrt(1 + 2 * torch.arange(N, dtype=torch.float64))
    legs = -(torch.tril(q[:, None] * q[None, :]) - torch.diag(torch.arange(N, dtype=torch.float64)))
    p = torch.sqrt(torch.arange(N, dtype=torch.float64) + 0.5)
    S = legs + p[:, None] * p[None, :]
    im, V = torch.linalg.eigh(S.to(torch.complex128) * -1j)
    return torch.diagonal(S).mean() + 1j * im, V


def cpair(x):
    return x.real.float(), x.imag.float()


class S5(ComplexDiagonalSSM):
    def __init__(self, p: S5Params, env: OpEnv):
        super().__init__()
        d, P = env.d, p.P
        self.N, self.chunk = P, p.chunk
        lam, Vb = hippo_n(P // p.blocks)
        lam, V = lam.repeat(p.blocks), torch.block_diag(*[Vb] * p.blocks)
        self.lambda_log = nn.Parameter(torch.log(-lam.real).float())
        self.lambda_im = nn.Parameter(lam.imag.float())
        self.log_step = nn.Parameter(torch.rand(P) * (math.log(p.dt_max) - math.log(p.dt_min)) + math.log(p.dt_min))
        B = (torch.randn(P, d, dtype=torch.float64) / math.sqrt(d)).to(torch.complex128)
        C = torch.complex(torch.randn(d, P, dtype=torch.float64), torch.randn(d, P, dtype=torch.float64)) / math.sqrt(2 * P)
        Bt, Ct = cpair(V.conj().T @ B), cpair(C @ V)
        self.B_re, self.B_im = nn.Parameter(Bt[0]), nn.Parameter(Bt[1])
        self.C_re, self.C_im = nn.Parameter(Ct[0]), nn.Parameter(Ct[1])
        self.D = nn.Parameter(torch.randn(d))

    def _discrete(self):
        re, im, step = -torch.exp(self.lambda_log), self.lambda_im, torch.exp(self.log_step)
        mod, ang = torch.exp(re * step), im * step
        return re, im, mod * torch.cos(ang), mod * torch.sin(ang)

    def decay(self):
        return self._discrete()[2:]

    def input_matrix(self):
        re, im, lr, li = self._discrete()
        inv = 1 / (re * re + im * im)
        qr, qi = ((lr - 1) * re + li * im) * inv, (li * re - (lr - 1) * im) * inv  # (Lambda_bar - 1) / Lambda
        return qr[:, None] * self.B_re - qi[:, None] * self.B_im, qr[:, None] * self.B_im + qi[:, None] * self.B_re


def s5_cost(p, env, s):
    return complex_diagonal_cost(p, env, s, N_field="P", small=25)


OP = register(Op(
    decode="the complex state x [P] (2 P reals): constant in the length",
    family="ssm", variant="s5", params=S5Params, module=S5, causal="yes", shape=s5_shape,
    paper="Simplified State Space Layers for Sequence Modeling, Smith, Warrington and Linderman 2023, arXiv:2208.04933",
    summary="Lambda_bar = exp(Lambda Delta), B_bar = (Lambda_bar - 1) / Lambda B~ (ZOH); x_t = Lambda_bar x_{t-1} + "
            "B_bar u_t; y = Re(C~ x_t) + D u_t; MIMO complex diagonal, HiPPO-N init, chunked doubling scan",
    cost=s5_cost, note="LongConv/003.md",
))
