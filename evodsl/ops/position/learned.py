"""pos(learned, max_len=L): h_t = x_t + P[t], a learned table of L absolute positions (Gehring et al. 2017)."""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost
from ..registry import Op, OpEnv, OpParams, register


class LearnedPositionParams(OpParams):
    max_len: int = Field(ge=1, le=1 << 24, description="positions in the table (longest sequence)")


class LearnedPosition(nn.Module):
    def __init__(self, p: LearnedPositionParams, env: OpEnv):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(p.max_len, env.d).normal_(0.0, 0.02))

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        n = x.shape[1]
        torch._check(n <= self.weight.shape[0], lambda: "sequence longer than pos(learned) max_len")
        return x + self.weight[:n]


def cost(p: LearnedPositionParams, env: OpEnv, s) -> Cost:
    """L·d parameters; the add, 1 FLOP per element; backward: P's gradient sums the batch, 1 per element.
    Nothing is kept. The input's gradient is the output's, passed on: nothing is created (bwd_peak 0)."""
    return Cost(params=s.sym("L", p.max_len) * s.d, fwd_other=s.b * s.n * s.d, bwd_other=s.b * s.n * s.d,
                bwd_peak=0)


OP = register(Op(
    family="pos", variant="learned", params=LearnedPositionParams, module=LearnedPosition, causal="yes",
    paper="Convolutional Sequence to Sequence Learning, Gehring et al. 2017, arXiv:1705.03122",
    summary="x_t + P[t], P learned, t < max_len", cost=cost,
))
