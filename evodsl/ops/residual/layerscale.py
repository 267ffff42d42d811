"""residual(layerscale): LayerScale (Touvron et al. 2021, CaiT), x_{l+1} = x_l + diag(lambda) F(x_l): the residual
branch is multiplied channel by channel by a learned vector lambda in R^d, every entry initialised to `init` (the
paper's epsilon), so that each block starts close to the identity while each channel learns its own gain.

Choices where the paper is silent or depth-dependent: CaiT sets epsilon = 0.1 up to depth 18, 1e-5 at depth 24
and 1e-6 deeper; `init` defaults to 1e-5 (timm's and DeiT III's default) and is set per call,
`residual(norm -> mha, scale=layerscale, init=0.1)`. The norm inside the branch (pre-norm, as in CaiT) is the
spec's, not the op's. lambda is not weight-decayed or otherwise special here: a plain [d] parameter."""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost
from ..registry import Op, OpEnv, OpParams, register


class LayerScaleParams(OpParams):
    init: float = Field(1e-5, ge=0.0, le=10.0, description="initial value of every lambda_c (the paper's eps)")


class LayerScale(nn.Module):
    def __init__(self, p: LayerScaleParams, env: OpEnv):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((env.d,), float(p.init)))  # lambda, one per channel

    def forward(self, fx: torch.Tensor, ctx=None) -> torch.Tensor:
        return fx * self.gamma


def cost(p: LayerScaleParams, env: OpEnv, s) -> Cost:
    """d parameters; diag(lambda)·F(x), 1 FLOP per element; backward: lambda·g for F(x) (1 per element) and
    sum over tokens of g·F(x) for lambda (2 per element), 3 per element. It keeps its input F(x) for lambda's
    gradient."""
    elems = s.b * s.n * s.d
    return Cost(params=s.d, fwd_other=elems, bwd_other=3 * elems, saves_input=True)


OP = register(Op(
    family="residual", variant="layerscale", params=LayerScaleParams, module=LayerScale, causal="n.a.",
    paper="Going deeper with Image Transformers, Touvron et al. 2021, arXiv:2103.17239",
    summary="x + diag(lambda) F(x), lambda in R^d learned, lambda(0) = init (eps)",
    cost=cost,
))
