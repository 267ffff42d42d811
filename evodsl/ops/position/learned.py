"""pos(learned, max_len=L): h_t = x_t + P[t], a learned table of L absolute positions (Gehring et al. 2017).
offset=k reads P[t + k] from a table of L + k rows: BART's 2 (rows fairseq kept for padding)."""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost
from ..cost import length
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register, sequence_shape


class LearnedPositionParams(OpParams):
    max_len: int = Field(ge=1, le=1 << 24, description="positions in the table (longest sequence)")
    offset: int = Field(0, ge=0, le=1 << 16, description="position t reads row t + offset (BART: 2)")


class LearnedPosition(nn.Module):
    def __init__(self, p: LearnedPositionParams, env: OpEnv):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(p.max_len + p.offset, env.d).normal_(0.0, 0.02))
        self.offset = p.offset

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        n, start = x.shape[1], self.offset + (ctx.offset if ctx is not None else 0)  # decoding: after those seen
        torch._check(start + n <= self.weight.shape[0], lambda: "sequence longer than pos(learned) max_len")
        return x + self.weight[start: start + n]


def _shape(p: LearnedPositionParams, env: OpEnv):
    sequence_shape(p, env)
    shortest = length(env.shape[1]).subs({s: 1 for s in length(env.shape[1]).free_symbols})
    if int(shortest) > p.max_len:  # a stream with tokens joined to it (n + 16) or of a fixed length
        raise ShapeProblem(f"pos(learned, max_len={p.max_len}) reads a stream of at least {shortest} positions "
                           f"([{', '.join(map(str, env.shape))}])", "max_len",
                           f"set max_len >= {shortest} plus the longest input")
    return env.shape


def cost(p: LearnedPositionParams, env: OpEnv, s) -> Cost:
    """L·d parameters; the add, 1 FLOP per element; backward: P's gradient sums the batch, 1 per element.
    Nothing is kept. The input's gradient is the output's, passed on: nothing is created (bwd_peak 0)."""
    return Cost(params=(s.sym("L", p.max_len) + p.offset) * s.d, fwd_other=s.b * s.n * s.d, bwd_other=s.b * s.n * s.d,
                bwd_peak=0)


OP = register(Op(
    decode="the positions after those seen (offset)",
    family="pos", variant="learned", params=LearnedPositionParams, module=LearnedPosition, causal="yes",
    shape=_shape,
    paper="Convolutional Sequence to Sequence Learning, Gehring et al. 2017, arXiv:1705.03122",
    summary="x_t + P[t + offset], P learned, t < max_len", cost=cost,
))
