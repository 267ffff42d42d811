"""norm(layernorm): y = (x - mean(x)) / sqrt(var(x) + eps) * g + b over the last dimension."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..cost import Cost
from ..registry import Op, OpEnv, OpParams, register


class LayerNormParams(OpParams):
    eps: float = Field(1e-5, gt=0.0, lt=1.0, description="added to the variance")
    bias: bool = Field(True, description="learned bias b")


class LayerNorm(nn.Module):
    def __init__(self, p: LayerNormParams, env: OpEnv):
        super().__init__()
        self.eps = p.eps
        self.weight = nn.Parameter(torch.ones(env.d))
        self.bias = nn.Parameter(torch.zeros(env.d)) if p.bias else None

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


def cost(p: LayerNormParams, env: OpEnv, s) -> Cost:
    """Per element: sum for the mean, centre, square, sum for the variance, normalise, scale g, shift b:
    7 FLOPs (6 without bias); backward ~2x. Kept for backward: the input, and mean and rstd [b, n]."""
    per = 7 if p.bias else 6
    tokens = s.b * s.n
    return Cost(params=s.d * (2 if p.bias else 1), fwd_other=per * tokens * s.d, bwd_other=2 * per * tokens * s.d,
                saves_input=True, saved=2 * tokens * s.bytes, peak=2 * tokens * s.bytes)


OP = register(Op(
    family="norm", variant="layernorm", params=LayerNormParams, module=LayerNorm, causal="n.a.",
    paper="Layer Normalization, Ba et al. 2016, arXiv:1607.06450",
    summary="(x - mean(x)) / sqrt(var(x) + eps) * g + b", cost=cost,
))
