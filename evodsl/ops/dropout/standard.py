"""dropout(p=0.1): zero each element with probability p and scale by 1/(1-p), in training only."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..registry import Op, OpEnv, OpParams, register


class DropoutParams(OpParams):
    p: float = Field(0.1, ge=0.0, lt=1.0, description="drop probability")


class Dropout(nn.Module):
    def __init__(self, p: DropoutParams, env: OpEnv):
        super().__init__()
        self.p = p.p

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        return F.dropout(x, self.p, self.training)


OP = register(Op(
    family="dropout", variant="standard", params=DropoutParams, module=Dropout, causal="n.a.",
    paper="Dropout, Srivastava et al. 2014, JMLR 15(56)", summary="x * Bernoulli(1-p) / (1-p) in training",
))
