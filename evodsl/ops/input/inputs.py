"""input(tokens, vocab=V) and input(features, d=D): what the model takes. Token ids [b, n] (int64) or
continuous features [b, n, D]. Both are the identity at run time; they fix the input's shape and vocabulary."""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost
from ..registry import Op, OpParams, register


class TokensParams(OpParams):
    vocab: int = Field(ge=2, le=1 << 24, description="vocabulary size (default: the binding vocab)")


class FeaturesParams(OpParams):
    d: int = Field(ge=1, le=1 << 20, description="feature width")


class ModelInput(nn.Module):
    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        return x


def cost(p, env, s) -> Cost:
    """The identity: free, and its output is the caller's tensor (not counted as activation memory)."""
    return Cost(inplace=True)


register(Op(
    family="input", variant="tokens", params=TokensParams, module=lambda p, env: ModelInput(), causal="n.a.",
    shape=lambda p, env: ("b", "n"), paper="-", summary="token ids [b, n] in [0, vocab)",
    cost=cost,
))
register(Op(
    family="input", variant="features", params=FeaturesParams, module=lambda p, env: ModelInput(),
    causal="n.a.", shape=lambda p, env: ("b", "n", p.d), paper="-", summary="features [b, n, d]",
    cost=cost,
))
