"""head(lm): logits = h W^T, with W the token embedding E when tied=true (Press & Wolf 2016); with rescale=true,
(h d^-1/2) W^T, as T5's tied head (Raffel et al. 2019: the embedding serves input and output at one scale); with
softcap=c, the final-logit soft-cap of Gemma 2 (arXiv:2408.00118, section 2; c = 30 there): logits <- c tanh(logits / c)."""
from __future__ import annotations

import sympy as sp
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..cost import Cost, linear
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register


class LMHeadParams(OpParams):
    tied: bool = Field(True, description="share the weight with embed(token)")
    bias: bool = Field(False, description="learned output bias")
    rescale: bool = Field(False, description="multiply h by d^-1/2 first (T5's tied head)")
    softcap: float | None = Field(None, gt=0, description="c: logits <- c tanh(logits / c) (Gemma 2: 30)")


def _shape(p: LMHeadParams, env: OpEnv):
    if env.vocab is None:
        raise ShapeProblem("head(lm) predicts tokens, but the model's input is not input(tokens, vocab=V)",
                           hint="use head(linear, d_out=...) for continuous outputs")
    if len(env.shape) != 3:
        raise ShapeProblem("head(lm) needs a [b, n, d] stream")
    return (*env.shape[:-1], env.vocab)


class LMHead(nn.Module):
    def __init__(self, p: LMHeadParams, env: OpEnv):
        super().__init__()
        self.tied = p.tied
        self.weight = None if p.tied else nn.Parameter(torch.empty(env.vocab, env.d).normal_(0.0, 0.02))
        self.bias = nn.Parameter(torch.zeros(env.vocab)) if p.bias else None
        self.multiplier = env.d ** -0.5 if p.rescale else None
        self.softcap = p.softcap

    def tie(self, embedding: nn.Module) -> None:
        """Called by the backend with the model's embed(token) module when tied=true."""
        self.weight = embedding.weight

    def forward(self, h: torch.Tensor, ctx=None) -> torch.Tensor:
        if self.multiplier is not None:
            h = h * self.multiplier
        z = F.linear(h, self.weight, self.bias)
        if self.softcap is None:
            return z
        if not z.requires_grad:  # in place: no second [b, n, V] tensor
            return z.div_(self.softcap).tanh_().mul_(self.softcap)
        return torch.tanh(z / self.softcap) * self.softcap


def cost(p: LMHeadParams, env: OpEnv, s) -> Cost:
    """The logits matmul, 2 b n d V; tied, the weight is embed(token)'s and adds no parameters. It keeps its
    input; the [b, n, V] logits are its output, which the cost pass accounts for. rescale: 1 FLOP per element
    forward and backward; the matmul keeps the scaled copy instead of the input, alive at the peak too. softcap:
    3 FLOPs per logit; the tanh kept for backward (in place without autograd), whose backward holds two [b, n, V]
    gradients (the tanh's and its input's), then the logits' beside the input's."""
    V = s.sym("V", env.vocab)
    c = linear(s, s.d, V, p.bias)
    h = s.b * s.n * s.d
    scaled = h * s.bytes if p.rescale else 0
    logits = s.b * s.n * V
    cap = 3 * logits if p.softcap is not None else 0  # divide, tanh, multiply
    kept = logits * s.bytes if p.softcap is not None else 0  # the tanh, kept for its gradient; in place without
    return Cost(params=(0 if p.tied else s.d * V) + (V if p.bias else 0), fwd=c.fwd, bwd=c.bwd,
                fwd_other=(h if p.rescale else 0) + cap, bwd_other=c.bwd_other + (h if p.rescale else 0) + 2 * cap,
                saves_input=not p.rescale, saved=scaled + kept, peak=scaled,
                bwd_peak=None if p.softcap is None else sp.Max(2 * logits, logits + h) * s.bytes)


OP = register(Op(
    family="head", variant="lm", params=LMHeadParams, module=LMHead, causal="n.a.", shape=_shape,
    paper="Using the Output Embedding to Improve Language Models, Press & Wolf 2016, arXiv:1608.05859",
    summary="logits = h E^T (tied) or h W^T (+ b); rescale: h d^-1/2 first; softcap: c tanh(logits / c)", note="LLM/000.md", cost=cost,
))
