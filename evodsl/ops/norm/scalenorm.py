"""norm(scalenorm): y = g * x / max(||x||_2, eps), with ONE learned scalar g initialised to sqrt(d)
(Nguyen & Salazar 2019): the token is projected onto the sphere of radius g."""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

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


OP = register(Op(
    family="norm", variant="scalenorm", params=ScaleNormParams, module=ScaleNorm, causal="n.a.",
    paper="Transformers without Tears: Improving the Normalization of Self-Attention, "
          "Nguyen & Salazar 2019, arXiv:1910.05895",
    summary="g * x / max(||x||_2, eps), g a learned scalar, g(0) = sqrt(d)",
    note="Normalize_And_Residual/006.md",
))
