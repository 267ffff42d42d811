"""embed(token): h = E[x] (times sqrt(d_model) with scale=true, as in Vaswani et al.)."""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from ..registry import Op, OpEnv, OpParams, ShapeProblem, register


class TokenEmbeddingParams(OpParams):
    d_model: int = Field(ge=1, le=1 << 20, description="embedding width (default: the binding d_model)")
    scale: bool = Field(False, description="multiply by sqrt(d_model)")
    segments: int = Field(0, ge=0, description="token-type (segment) embeddings added, as in BERT; 0 = none")


def _shape(p: TokenEmbeddingParams, env: OpEnv):
    if env.vocab is None or len(env.shape) != 2:
        raise ShapeProblem("embed(token) needs token ids from input(tokens, vocab=V)",
                           hint="for continuous inputs use input(features, d=...) -> embed(linear)")
    return (*env.shape, p.d_model)


class TokenEmbedding(nn.Module):
    def __init__(self, p: TokenEmbeddingParams, env: OpEnv):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(env.vocab, p.d_model).normal_(0.0, 0.02))
        self.segment = nn.Embedding(p.segments, p.d_model) if p.segments else None
        self.multiplier = math.sqrt(p.d_model) if p.scale else 1.0

    def forward(self, ids: torch.Tensor, ctx=None) -> torch.Tensor:
        h = nn.functional.embedding(ids, self.weight)
        if self.multiplier != 1.0:
            h = h * self.multiplier
        if self.segment is not None:  # segment ids default to 0 (one segment), as in BertModel
            h = h + self.segment.weight[0]
        return h


OP = register(Op(
    family="embed", variant="token", params=TokenEmbeddingParams, module=TokenEmbedding, causal="n.a.",
    shape=_shape, paper="Attention Is All You Need, Vaswani et al. 2017, arXiv:1706.03762",
    summary="E[x] (* sqrt(d_model) if scale)",
))
