"""pos(sinusoidal, base=10000): h_t = x_t + PE[t], the fixed table of Vaswani et al. 2017:
PE(t, 2i) = sin(t / base^(2i/d)), PE(t, 2i+1) = cos(t / base^(2i/d)).

No parameters and no length limit: the table is computed for the actual n on every call (O(n d), the same
as the addition). An odd d keeps the last sine channel and drops its cosine partner.
"""
from __future__ import annotations

import sympy as sp
import torch
from pydantic import Field
from torch import nn

from ..cost import Cost
from ..registry import Op, OpEnv, OpParams, register, sequence_shape


class SinusoidalPositionParams(OpParams):
    base: float = Field(10000.0, gt=1.0, description="wavelengths run from 2π to base·2π")


def sinusoidal_table(n: int, d: int, base: float, device=None, dtype=torch.float32, offset: int = 0) -> torch.Tensor:
    """PE [n, d] of positions t = offset..offset+n-1: column 2i is sin(t·ω_i), column 2i+1 is cos(t·ω_i), with
    ω_i = base^(-2i/d)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32  # angles in at least float32
    t = torch.arange(offset, offset + n, device=device, dtype=work)
    omega = base ** (-torch.arange(0, d, 2, device=device, dtype=work) / d)  # [ceil(d/2)]
    angle = t[:, None] * omega[None, :]
    return torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(-2)[:, :d].to(dtype)


class SinusoidalPosition(nn.Module):
    def __init__(self, p: SinusoidalPositionParams, env: OpEnv):
        super().__init__()
        self.base = p.base

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        offset = ctx.offset if ctx is not None else 0  # decoding: the positions after those seen
        return x + sinusoidal_table(x.shape[1], x.shape[-1], self.base, x.device, x.dtype, offset)

    def extra_repr(self) -> str:
        return f"base={self.base:g}"


def cost(p: SinusoidalPositionParams, env: OpEnv, s) -> Cost:
    """The table: angles, sin and cos, n·d/2 FLOPs each; the add, 1 per element; backward free (no
    parameters). Nothing is kept. At the inference peak either the angles, sines, cosines and their interleaved
    stack are alive (in float32, or float64) with t [n] and ω [d/2], or the [n, d] table beside the output.
    The input's gradient is the output's, passed on (bwd_peak 0)."""
    work = 8 if s.bytes == 8 else 4  # the angles' dtype
    out = s.b * s.n * s.d * s.bytes
    angles = (sp.Rational(5, 2) * s.n * s.d + s.n + s.d / 2) * work
    table = sp.Max(angles, s.n * s.d * s.bytes + out) - out
    return Cost(fwd_other=sp.Rational(3, 2) * s.n * s.d + s.b * s.n * s.d, peak=table, bwd_peak=0)


OP = register(Op(
    decode="the positions after those seen (offset)",
    shape=sequence_shape, family="pos", variant="sinusoidal", params=SinusoidalPositionParams, module=SinusoidalPosition,
    causal="yes",
    paper="Attention Is All You Need, Vaswani et al. 2017, arXiv:1706.03762",
    summary="x_t + PE[t], PE(t, 2i) = sin(t / base^(2i/d)), PE(t, 2i+1) = cos(t / base^(2i/d))",
    cost=cost,
))
