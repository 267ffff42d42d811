"""head(linear, d_out=K): y = W h + b, a per-token projection to K outputs (regression, tagging)."""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost, linear
from ..registry import Op, OpEnv, OpParams, register


class LinearHeadParams(OpParams):
    d_out: int = Field(ge=1, le=1 << 24, description="output width")
    bias: bool = Field(True, description="learned bias b")


class LinearHead(nn.Module):
    def __init__(self, p: LinearHeadParams, env: OpEnv):
        super().__init__()
        self.proj = nn.Linear(env.d, p.d_out, bias=p.bias)

    def forward(self, h: torch.Tensor, ctx=None) -> torch.Tensor:
        return self.proj(h)


def cost(p: LinearHeadParams, env: OpEnv, s) -> Cost:
    """One linear from d to d_out; it keeps its input."""
    rows = s.b if len(env.in_shapes[0]) == 2 else None  # after head(pooler): one row per sequence, [b, d]
    return linear(s, s.d, s.sym("d_out", p.d_out), p.bias, tokens=rows)


OP = register(Op(
    family="head", variant="linear", params=LinearHeadParams, module=LinearHead, causal="n.a.",
    shape=lambda p, env: (*env.shape[:-1], p.d_out),
    paper="Attention Is All You Need, Vaswani et al. 2017, arXiv:1706.03762 (output projection)",
    summary="W h + b", cost=cost,
))
