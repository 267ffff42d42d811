"""embed(token): h = E[x] (times sqrt(d_model) with scale=true, as in Vaswani et al.). With tied=true, E is the
model's first embed(token)'s: one table for an encoder-decoder's source and target (and a tied head)."""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register


class TokenEmbeddingParams(OpParams):
    d_model: int = Field(ge=1, le=1 << 20, description="embedding width (default: the binding d_model)")
    scale: bool = Field(False, description="multiply by sqrt(d_model)")
    segments: int = Field(0, ge=0, description="token-type (segment) embeddings added, as in BERT; 0 = none")
    tied: bool = Field(False, description="share E with the model's first embed(token) (an encoder-decoder's "
                                          "source and target)")


def _shape(p: TokenEmbeddingParams, env: OpEnv):
    if env.vocab is None or len(env.shape) != 2 or isinstance(env.shape[1], int):  # [b, d]: a pooled vector
        raise ShapeProblem("embed(token) needs token ids [b, n] from input(tokens, vocab=V)",
                           hint="for continuous inputs use input(features, d=...) -> embed(linear)")
    return (*env.shape, p.d_model)


class TokenEmbedding(nn.Module):
    def __init__(self, p: TokenEmbeddingParams, env: OpEnv):
        super().__init__()
        self.weight = None if p.tied else nn.Parameter(torch.empty(env.vocab, p.d_model).normal_(0.0, 0.02))
        self.segment = nn.Embedding(p.segments, p.d_model) if p.segments else None
        self.multiplier = math.sqrt(p.d_model) if p.scale else 1.0

    def tie(self, embedding: nn.Module) -> None:
        """Called by the backend with the model's first embed(token) module when tied=true."""
        self.weight = embedding.weight

    def forward(self, ids: torch.Tensor, ctx=None) -> torch.Tensor:
        h = nn.functional.embedding(ids, self.weight)
        if self.multiplier != 1.0:
            h = h * self.multiplier
        if self.segment is not None:  # segment ids default to 0 (one segment), as in BertModel
            types = None if ctx is None else ctx.token_type_ids
            h = h + (self.segment.weight[0] if types is None else nn.functional.embedding(types, self.segment.weight))
        return h


def cost(p: TokenEmbeddingParams, env: OpEnv, s) -> Cost:
    """A lookup is no FLOP; its backward scatter-adds the gradient into E (1 per element). The sqrt(d) scale and
    the segment add cost 1 per element each; backward: the scale's product, the segment row's sum. It keeps its
    int64 ids for backward (saves_input; the pass counts the ids, input(tokens)'s output, as in place). Its
    input, token ids, has no gradient: a backward through the activations stops at its output."""
    d, V = s.sym("d", p.d_model), s.sym("V", env.vocab)
    elems = s.b * s.n * d
    steps = int(p.scale) + int(p.segments > 0)  # elementwise ops after the lookup
    return Cost(params=((0 if p.tied else V) + p.segments) * d, fwd_other=steps * elems, bwd_other=(1 + steps) * elems,
                saves_input=True, peak=(elems * s.bytes if steps else 0), bwd_peak=0)


OP = register(Op(
    family="embed", variant="token", params=TokenEmbeddingParams, module=TokenEmbedding, causal="n.a.",
    shape=_shape, paper="Attention Is All You Need, Vaswani et al. 2017, arXiv:1706.03762",
    summary="E[x] (* sqrt(d_model) if scale); tied: E is the model's first embed(token)'s", cost=cost,
))
