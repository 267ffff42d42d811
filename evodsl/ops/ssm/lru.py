"""ssm(lru, N=64): the Linear Recurrent Unit (Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks for Long
Sequences", arXiv:2303.06349, Section 3 and Appendix A), as a sublayer on features u [b, n, d] (H = d):

    lam    = exp(-exp(nu) + i exp(theta))                      [N] complex, |lam| = exp(-exp(nu)) < 1
    gamma  = exp(gamma_log)                                    init sqrt(1 - |lam|^2)  (the normalisation)
    x_t    = lam . x_{t-1} + gamma . (B u_t)                   B [N, d] complex
    y_t    = Re(C x_t) + D . u_t                               C [d, N] complex, D [d] real

The ring initialisation: |lam| uniform on the ring r_min <= |lam| <= r_max (|lam|^2 uniform in [r_min^2, r_max^2]),
its phase uniform in [0, max_phase]; nu = log(-log |lam|), theta = log(phase); B, C complex Gaussian, B's
entries of variance 1 / d (re and im each 1 / (2 d)), C's 1 / N; D standard normal. The op is the recurrence and
its readout (_complex_diagonal.py); the paper's block around it (LayerNorm, then the LRU, GELU, dropout, a GLU
out of y, dropout, the residual) is the spec's: `residual(norm -> ssm(lru) -> ffn(glu))` is close, with the GLU an
FFN of its own. The paper's defaults for long-range tasks r_min = 0.9, r_max = 0.999, max_phase = pi / 10 are ours.
Training runs the chunked doubling scan (rnn/_diag_scan.py: the parallel scan the paper uses); decoding the step,
from the complex state x [N] (2 N reals), whatever the length. Causal only; padding as _complex_diagonal.py says.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from ..registry import Op, OpEnv, OpParams, register
from ._complex_diagonal import ComplexDiagonalSSM, causal_only_shape
from ._complex_diagonal_cost import complex_diagonal_cost


class LRUParams(OpParams):
    N: int = Field(64, ge=1, le=4096, description="the complex state size")
    r_min: float = Field(0.9, ge=0.0, lt=1.0, description="the ring's inner radius: |lam| at init")
    r_max: float = Field(0.999, gt=0.0, lt=1.0, description="the ring's outer radius")
    max_phase: float = Field(0.314, gt=0.0, le=6.3, description="the phases' range at init, [0, max_phase]")
    chunk: int = Field(64, ge=1, le=4096, description="T: tokens per chunk of the scan (the result is the same)")


def lru_shape(p: LRUParams, env: OpEnv):
    shape = causal_only_shape("lru")(p, env)
    if p.r_min >= p.r_max:
        from ..registry import ShapeProblem
        raise ShapeProblem(f"r_min={p.r_min} is not below r_max={p.r_max}", "r_min", "the ring needs r_min < r_max")
    return shape


class LRU(ComplexDiagonalSSM):
    def __init__(self, p: LRUParams, env: OpEnv):
        super().__init__()
        d, N = env.d, p.N
        self.N, self.chunk = N, p.chunk
        u1, u2 = torch.rand(N), torch.rand(N)
        r2 = u1 * (p.r_max ** 2 - p.r_min ** 2) + p.r_min ** 2  # |lam|^2 uniform on the ring
        self.nu_log = nn.Parameter(torch.log(-0.5 * torch.log(r2)))
        self.theta_log = nn.Parameter(torch.log(p.max_phase * u2.clamp(min=1e-6)))
        self.gamma_log = nn.Parameter(0.5 * torch.log(1 - r2))
        self.B_re = nn.Parameter(torch.randn(N, d) / math.sqrt(2 * d))
        self.B_im = nn.Parameter(torch.randn(N, d) / math.sqrt(2 * d))
        self.C_re = nn.Parameter(torch.randn(d, N) / math.sqrt(2 * N))
        self.C_im = nn.Parameter(torch.randn(d, N) / math.sqrt(2 * N))
        self.D = nn.Parameter(torch.randn(d))

    def decay(self):
        mod, phase = torch.exp(-torch.exp(self.nu_log)), torch.exp(self.theta_log)
        return mod * torch.cos(phase), mod * torch.sin(phase)

    def input_matrix(self):
        g = torch.exp(self.gamma_log)[:, None]
        return g * self.B_re, g * self.B_im


OP = register(Op(
    decode="the complex state x [N] (2 N reals): constant in the length",
    family="ssm", variant="lru", params=LRUParams, module=LRU, causal="yes", shape=lru_shape,
    paper="Resurrecting Recurrent Neural Networks for Long Sequences, Orvieto et al. 2023, arXiv:2303.06349",
    summary="lam = exp(-exp(nu) + i exp(theta)); x_t = lam x_{t-1} + exp(gamma_log) (B u_t); y = Re(C x_t) + D u_t; "
            "complex diagonal, ring init, chunked doubling scan O(n N d)",
    cost=complex_diagonal_cost, note="LongConv/011.md",
))
