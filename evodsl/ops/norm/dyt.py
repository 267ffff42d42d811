"""norm(dyt): Dynamic Tanh (Zhu et al. 2025, "Transformers without Normalization"), a drop-in replacement for a
norm layer: DyT(x) = gamma * tanh(alpha x) + beta, alpha ONE learned scalar initialised to alpha0, gamma and beta
learned per channel [d], initialised to ones and zeros (the norm's affine). No statistics: element-wise, no
reduction over the features.

Choices: alpha0 defaults to the paper's 0.5 (its non-LLM default); the paper's LLaMA recipe sets alpha0 per
position (higher before attention than before the FFN and the final norm, and by width): set it per call,
`norm(dyt, alpha0=0.8)`. beta is always there (the paper's DyT has it)."""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost
from ..registry import Op, OpEnv, OpParams, register


class DyTParams(OpParams):
    alpha0: float = Field(0.5, gt=0.0, le=100.0, description="initial alpha (the paper's alpha_0)")


class DynamicTanh(nn.Module):
    def __init__(self, p: DyTParams, env: OpEnv):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(p.alpha0)))
        self.weight = nn.Parameter(torch.ones(env.d))  # gamma
        self.bias = nn.Parameter(torch.zeros(env.d))  # beta

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        return torch.addcmul(self.bias, self.weight, torch.tanh(self.alpha * x))


def cost(p: DyTParams, env: OpEnv, s) -> Cost:
    """2d + 1 parameters. Per element: alpha·x, tanh, gamma·t + beta (addcmul, 2): 4 FLOPs; backward ~2x.
    Kept for backward: the input (alpha's and x's gradient) and t = tanh(alpha x) (gamma's gradient and tanh's
    own, 1 - t^2). At the inference peak one [b, n, d] temporary beside the output (alpha·x, then t). Backward:
    the incoming gradient times gamma, times (1 - t^2), times alpha, with the sums for gamma and alpha: two
    [b, n, d] temporaries at a time."""
    elems = s.b * s.n * s.d
    return Cost(params=2 * s.d + 1, fwd_other=4 * elems, bwd_other=8 * elems, saves_input=True,
                saved=elems * s.bytes, peak=elems * s.bytes, bwd_peak=2 * elems * s.bytes)


OP = register(Op(
    family="norm", variant="dyt", params=DyTParams, module=DynamicTanh, causal="n.a.",
    paper="Transformers without Normalization, Zhu et al. 2025, arXiv:2503.10622",
    summary="gamma * tanh(alpha x) + beta, alpha a learned scalar, alpha(0) = alpha0 (no statistics)", cost=cost,
))
