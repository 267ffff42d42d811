"""norm(rmsnorm): y = x / sqrt(mean(x^2) + eps) * g over the last dimension; no re-centring, no bias."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..registry import Op, OpEnv, OpParams, register


class RMSNormParams(OpParams):
    eps: float = Field(1e-6, gt=0.0, lt=1.0, description="added to mean(x^2); 1e-6 as in LLaMA")


class RMSNorm(nn.Module):
    def __init__(self, p: RMSNormParams, env: OpEnv):
        super().__init__()
        self.eps = p.eps
        self.weight = nn.Parameter(torch.ones(env.d))

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)


OP = register(Op(
    family="norm", variant="rmsnorm", params=RMSNormParams, module=RMSNorm, causal="n.a.",
    paper="Root Mean Square Layer Normalization, Zhang & Sennrich 2019, arXiv:1910.07467",
    summary="x / sqrt(mean(x^2) + eps) * g",
    note="Others/002.md",  # Narang et al. 2021: across implementations, RMSNorm transfers best
))
