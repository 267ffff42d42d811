"""dropout(p=0.1): zero each element with probability p and scale by 1/(1-p), in training only."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..cost import Cost
from ..registry import Op, OpEnv, OpParams, register


class DropoutParams(OpParams):
    p: float = Field(0.1, ge=0.0, lt=1.0, description="drop probability")


class Dropout(nn.Module):
    def __init__(self, p: DropoutParams, env: OpEnv):
        super().__init__()
        self.p = p.p

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        return F.dropout(x, self.p, self.training)


def cost(p: DropoutParams, env: OpEnv, s) -> Cost:
    """The identity at inference (in place). In training: sample, scale by 1/(1-p), multiply, 1 FLOP per
    element each; backward one product. It keeps the scaled noise: on CPU torch 2.13 draws it in the model's
    dtype (the fused CUDA kernel keeps a bool mask instead, 1 byte per element). p = 0 is the identity."""
    if p.p == 0:
        return Cost(inplace=True)
    elems = s.b * s.n * s.d
    return Cost(fwd_other=3 * elems, bwd_other=elems, saved=elems * s.bytes, inplace=True,
                inplace_in_training=False)


OP = register(Op(
    family="dropout", variant="standard", params=DropoutParams, module=Dropout, causal="n.a.",
    paper="Dropout, Srivastava et al. 2014, JMLR 15(56)", summary="x * Bernoulli(1-p) / (1-p) in training",
    cost=cost,
))
