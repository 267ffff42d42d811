"""residual(rezero): the residual branch is scaled by a learned scalar alpha, initialised to 0, so that
residual(f, scale=rezero) computes x + alpha * f(x) (Bachlechner et al. 2020); used without norms."""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost
from ..registry import Op, OpEnv, OpParams, register


class ReZeroParams(OpParams):
    init: float = Field(0.0, ge=-10.0, le=10.0, description="initial alpha")


class ReZeroScale(nn.Module):
    def __init__(self, p: ReZeroParams, env: OpEnv):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(p.init)))
        self.init_value = float(p.init)

    def forward(self, fx: torch.Tensor, ctx=None) -> torch.Tensor:
        return self.alpha * fx


def cost(p: ReZeroParams, env: OpEnv, s) -> Cost:
    """One parameter; alpha·F(x), 1 FLOP per element; backward: alpha·g for F(x), sum(g·F(x)) for alpha,
    3 per element. It keeps its input F(x) for alpha's gradient."""
    elems = s.b * s.n * s.d
    return Cost(params=1, fwd_other=elems, bwd_other=3 * elems, saves_input=True)


OP = register(Op(
    family="residual", variant="rezero", params=ReZeroParams, module=ReZeroScale, causal="n.a.",
    paper="ReZero is All You Need, Bachlechner et al. 2020, arXiv:2003.04887",
    summary="x + alpha * F(x), alpha learned, alpha(0) = 0", note="Normalize_And_Residual/001.md",
    cost=cost,
))
