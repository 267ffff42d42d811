"""embed(linear): h = W x + b, projecting continuous input features [b, n, d_in] to d_model."""
from __future__ import annotations

from dataclasses import replace

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost, linear
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register


class LinearEmbeddingParams(OpParams):
    d_model: int = Field(ge=1, le=1 << 20, description="output width (default: the binding d_model)")
    bias: bool = Field(True, description="learned bias b")


def _shape(p: LinearEmbeddingParams, env: OpEnv):
    if len(env.shape) != 3:
        raise ShapeProblem("embed(linear) needs features [b, n, d] from input(features, d=...)",
                           hint="token ids are embedded with embed(token)")
    return (*env.shape[:-1], p.d_model)


class LinearEmbedding(nn.Module):
    def __init__(self, p: LinearEmbeddingParams, env: OpEnv):
        super().__init__()
        self.proj = nn.Linear(env.d, p.d_model, bias=p.bias)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        return self.proj(x)


def cost(p: LinearEmbeddingParams, env: OpEnv, s) -> Cost:
    """One linear from the feature width d to d_model; it keeps its input. On the model's input (features), which
    needs no gradient, the backward computes the weight's gradient only and makes no input gradient; after other
    layers (FNet's projection after the embeddings' norm) it computes both."""
    c = linear(s, s.d, s.sym("d_model", p.d_model), p.bias)
    return c if env.in_grad else replace(c, bwd=c.bwd / 2, bwd_peak=0)


OP = register(Op(
    family="embed", variant="linear", params=LinearEmbeddingParams, module=LinearEmbedding, causal="n.a.",
    shape=_shape, paper="Attention Is All You Need, Vaswani et al. 2017, arXiv:1706.03762 (input projection)",
    summary="W x + b", cost=cost,
))
