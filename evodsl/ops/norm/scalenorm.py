"""norm(scalenorm): y = g * x / max(||x||_2, eps), with ONE learned scalar g initialised to sqrt(d)
(Nguyen & Salazar 2019): the token is projected onto the sphere of radius g."""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost
from ..registry import Op, OpEnv, OpParams, register


class ScaleNormParams(OpParams):
    eps: float = Field(1e-5, gt=0.0, lt=1.0, description="lower bound on ||x||_2")


class ScaleNorm(nn.Module):
    def __init__(self, p: ScaleNormParams, env: OpEnv):
        super().__init__()
        self.eps = p.eps
        self.scale = nn.Parameter(torch.tensor(math.sqrt(env.d)))  # g, the paper's init sqrt(d)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(self.eps)
        return x * (self.scale / norm)


def cost(p: ScaleNormParams, env: OpEnv, s) -> Cost:
    """One parameter, g. Per element: square, sum, multiply by g/||x||: 3 FLOPs (per-token work is dropped);
    backward ~2x. Kept for backward: ||x||, its clamp and g/||x||, each [b, n, 1]; two are alive at the peak.
    Backward: the gradient through x and the one through ||x|| (two [b, n, d]) and their sum (per-token
    values left out)."""
    tokens = s.b * s.n
    return Cost(params=1, fwd_other=3 * tokens * s.d, bwd_other=6 * tokens * s.d,
                saves_input=True, saved=3 * tokens * s.bytes, peak=2 * tokens * s.bytes,
                bwd_peak=3 * tokens * s.d * s.bytes)


OP = register(Op(
    family="norm", variant="scalenorm", params=ScaleNormParams, module=ScaleNorm, causal="n.a.",
    paper="Transformers without Tears: Improving the Normalization of Self-Attention, "
          "Nguyen & Salazar 2019, arXiv:1910.05895",
    summary="g * x / max(||x||_2, eps), g a learned scalar, g(0) = sqrt(d)", cost=cost,
    note="Normalize_And_Residual/006.md",
))
