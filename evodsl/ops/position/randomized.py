"""pos(randomized, max_len=L, scheme=sinusoidal|learned): randomized positional encodings (Ruoss et al. 2023,
"Randomized Positional Encodings Boost Length Generalization of Transformers", arXiv:2305.16843), around an
absolute scheme added to the stream; pos(randomized_rope) is the same around RoPE, inside attention.

In training, the n positions of a batch are a sorted random sample of n distinct values from {0, ..., L − 1}
(L >= the longest test length, the paper's L >> N), drawn fresh for every forward by torch's RNG
(torch.manual_seed makes them reproducible); every row of the batch and every layer reads the same sample, as
in the authors' code. Outside training (eval, decoding, export) the positions are 0..n−1 (decoding: offset..),
the encoding's own. Then h_t = x_t + PE[pos_t]:
- scheme=sinusoidal: PE(p, 2i) = sin(p / base^(2i/d)), PE(p, 2i+1) = cos(p / base^(2i/d)) (pos(sinusoidal)'s);
- scheme=learned: PE = P[p], a learned table of L rows (pos(learned, max_len=L)'s).
Choices where the paper is silent: positions from 0 (the paper writes 1..L); one sample per batch, not per row.
"""
from __future__ import annotations

from typing import Literal

import sympy as sp
import torch
from pydantic import Field
from torch import nn

from ..cost import Cost
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register, sequence_shape

CTX_KEY = "randomized_positions"  # where the stream module leaves a training batch's sample for the layers after it


class RandomizedParams(OpParams):
    max_len: int = Field(ge=1, le=1 << 24, description="L: positions are drawn from 0..L-1 (L >= the longest test)")
    scheme: Literal["sinusoidal", "learned"] = Field("sinusoidal", description="the absolute encoding it wraps")
    base: float = Field(10000.0, gt=1.0, description="scheme=sinusoidal: wavelengths 2π .. base·2π")


def sample_positions(n: int, limit: int, device) -> torch.Tensor:
    """A sorted sample of n distinct positions of 0..limit-1 (int64 [n]), by torch's RNG."""
    torch._check(n <= limit, lambda: f"a sequence of {n} positions is longer than max_len={limit}")
    return torch.randperm(limit, device=device)[:n].sort().values


def positions(module: nn.Module, n: int, limit: int, device, ctx) -> torch.Tensor:
    """This forward's positions: a fresh sample in training (left in ctx for the layers after it), else offset..
    offset+n-1."""
    if module.training:
        pos = sample_positions(n, limit, device)
        if ctx is not None:
            ctx.extra[CTX_KEY] = pos
        return pos
    start = ctx.offset if ctx is not None else 0
    return torch.arange(start, start + n, device=device)


class RandomizedPosition(nn.Module):
    def __init__(self, p: RandomizedParams, env: OpEnv):
        super().__init__()
        self.scheme, self.max_len, self.base = p.scheme, p.max_len, p.base
        if p.scheme == "learned":
            self.weight = nn.Parameter(torch.empty(p.max_len, env.d).normal_(0.0, 0.02))

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        pos = positions(self, x.shape[1], self.max_len, x.device, ctx)
        if self.scheme == "learned":
            return x + self.weight[pos]
        return x + sinusoidal_at(pos, x.shape[-1], self.base, x.dtype)

    def extra_repr(self) -> str:
        return f"scheme={self.scheme}, max_len={self.max_len}"


def sinusoidal_at(pos: torch.Tensor, d: int, base: float, dtype) -> torch.Tensor:
    """PE [n, d] at the given positions (pos(sinusoidal)'s table, rows pos)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    omega = base ** (-torch.arange(0, d, 2, device=pos.device, dtype=work) / d)
    angle = pos.to(work)[:, None] * omega[None, :]
    return torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(-2)[:, :d].to(dtype)


def _shape(p: RandomizedParams, env: OpEnv):
    sequence_shape(p, env)
    if p.max_len < 2:
        raise ShapeProblem("pos(randomized, max_len=1) has one position to draw from", "max_len",
                           "set max_len well above the training length (the paper: L >> N)")
    return env.shape


def cost(p: RandomizedParams, env: OpEnv, s) -> Cost:
    """Learned: L·d parameters, the gather and the add (1 FLOP per element; backward, the table's gradient
    scattered back, 1 per element; the gather keeps its int64 positions). Sinusoidal: pos(sinusoidal)'s table at
    n positions (3 n d / 2 FLOPs) and the add. Inference (eval) positions are 0..n-1; the training sample
    (randperm over L, O(L)) is not counted. At the peak the table [n, d] is alive beside the output (sinusoidal:
    its angles, sines, cosines and their stack, at least float32)."""
    add = s.b * s.n * s.d
    if p.scheme == "learned":
        return Cost(params=s.sym("L", p.max_len) * s.d, fwd_other=add, bwd_other=add,
                    peak=s.n * s.d * s.bytes + 8 * s.n, saved=8 * s.n, bwd_peak=0)
    work = 8 if s.bytes == 8 else 4
    out = s.b * s.n * s.d * s.bytes
    angles = (sp.Rational(5, 2) * s.n * s.d + s.d / 2) * work + 16 * s.n
    table = sp.Max(angles, s.n * s.d * s.bytes + out) - out
    return Cost(fwd_other=sp.Rational(3, 2) * s.n * s.d + add, peak=table, bwd_peak=0)


OP = register(Op(
    decode="the positions after those seen (offset), as outside training",
    shape=_shape, family="pos", variant="randomized", params=RandomizedParams, module=RandomizedPosition,
    causal="yes", cost=cost,
    paper="Randomized Positional Encodings Boost Length Generalization of Transformers, Ruoss et al. 2023, "
          "arXiv:2305.16843",
    summary="training: x_t + PE[p_t], p a sorted random sample of n distinct positions of 0..L-1 per batch; "
            "eval: p_t = t (PE: sinusoidal or learned)",
    note="Pe/013.md",
))
