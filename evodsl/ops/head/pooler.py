"""head(pooler): BERT's pooler, y = tanh(W h_0 + b) on the first ([CLS]) token only: [b, n, d] -> [b, d]."""
from __future__ import annotations

import torch
from torch import nn

from ..cost import Cost, linear
from ..registry import NoParams, Op, OpEnv, ShapeProblem, register


def _shape(p: NoParams, env: OpEnv):
    if len(env.shape) != 3:
        raise ShapeProblem("head(pooler) needs a [b, n, d] stream")
    return (env.shape[0], env.d)


class Pooler(nn.Module):
    def __init__(self, p: NoParams, env: OpEnv):
        super().__init__()
        self.dense = nn.Linear(env.d, env.d)

    def forward(self, h: torch.Tensor, ctx=None) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))


def cost(p: NoParams, env: OpEnv, s) -> Cost:
    """A d x d linear on b tokens (the first of each sequence), then tanh (1 FLOP per element, backward 2).
    The linear keeps h[:, 0], a view that holds the whole input; tanh keeps its output. At the inference peak
    the linear's [b, d] result is alive beside the output. Backward: h[:, 0]'s gradient, then the input's,
    zeros but for the first token."""
    c = linear(s, s.d, s.d, True, tokens=s.b)
    return Cost(params=c.params, fwd=c.fwd, bwd=c.bwd, fwd_other=s.b * s.d, bwd_other=c.bwd_other + 2 * s.b * s.d,
                saves_input=True, saves_output=True, peak=s.b * s.d * s.bytes,
                bwd_peak=s.b * s.n * s.d * s.bytes + s.b * s.d * s.bytes)


OP = register(Op(
    family="head", variant="pooler", params=NoParams, module=Pooler, causal="n.a.", shape=_shape,
    paper="BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding, "
          "Devlin et al. 2018, arXiv:1810.04805",
    summary="tanh(W h_0 + b), h_0 the first token's state", cost=cost,
))
