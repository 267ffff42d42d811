"""merge(sum|mean|concat): how parallel(a, b, ..., merge=V) combines its k branches.

sum: y = sum_i y_i; mean: y = (1/k) sum_i y_i; concat: y = W [y_1; ...; y_k] + b, a projection from k*d back to
d, as Branchformer's concatenation merge (Peng et al. 2022)."""
from __future__ import annotations

from functools import partial

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost, linear
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register


class NoMergeParams(OpParams):
    pass


class ConcatParams(OpParams):
    bias: bool = Field(True, description="bias of the projection")


def _same(p, env: OpEnv):
    first = env.in_shapes[0]
    for s in env.in_shapes[1:]:
        if tuple(s) != tuple(first):
            raise ShapeProblem(f"parallel branches disagree in shape: [{', '.join(map(str, first))}] vs "
                               f"[{', '.join(map(str, s))}]", hint="every branch must keep the stream's width")
    return first


class SumMerge(nn.Module):
    def __init__(self, mean: bool):
        super().__init__()
        self.mean = mean

    def forward(self, xs: list, ctx=None) -> torch.Tensor:
        y = xs[0]
        for x in xs[1:]:
            y = y + x
        return y / len(xs) if self.mean else y


class ConcatMerge(nn.Module):
    def __init__(self, p: ConcatParams, env: OpEnv):
        super().__init__()
        self.proj = nn.Linear(env.d * len(env.in_shapes), env.d, bias=p.bias)

    def forward(self, xs: list, ctx=None) -> torch.Tensor:
        return self.proj(torch.cat(xs, dim=-1))


def sum_cost(p, env: OpEnv, s, mean: bool = False) -> Cost:
    """k - 1 adds (and the 1/k scale for mean), 1 FLOP per element each; backward: the adds pass the gradient
    through, mean scales it once. Nothing is kept. At the inference peak one partial sum is alive beside the
    output (none when the two branches' sum is the output itself). Backward: every branch gets the output's
    gradient itself (sum: nothing is created), or its 1/k scaling, one tensor shared by all (mean)."""
    k = len(env.in_shapes)
    elems = s.b * s.n * s.d
    return Cost(fwd_other=(k - 1 + int(mean)) * elems, bwd_other=int(mean) * elems,
                peak=elems * s.bytes if (k > 2 or mean) else 0, bwd_peak=elems * s.bytes if mean else 0)


def concat_cost(p: ConcatParams, env: OpEnv, s) -> Cost:
    """A linear from k·d to d on the concatenation (a copy: no FLOPs), which it keeps for backward and which is
    alive at the inference peak; the branches themselves are not kept. Backward: the concatenation's gradient,
    whose slices are the branches' (bwd_peak: the default, the inputs' gradients)."""
    k = s.sym("k", len(env.in_shapes))
    cat = k * s.b * s.n * s.d * s.bytes
    c = linear(s, k * s.d, s.d, p.bias)
    return Cost(params=c.params, fwd=c.fwd, bwd=c.bwd, bwd_other=c.bwd_other, saved=cat, peak=cat)


PAPER = "Branchformer, Peng et al. 2022, arXiv:2207.02971"
register(Op(family="merge", variant="sum", params=NoMergeParams, module=lambda p, env: SumMerge(False),
            causal="n.a.", shape=_same, inputs=-1, paper=PAPER, summary="sum_i y_i", note="Arch/007.md",
            cost=sum_cost))
register(Op(family="merge", variant="mean", params=NoMergeParams, module=lambda p, env: SumMerge(True),
            causal="n.a.", shape=_same, inputs=-1, paper=PAPER, summary="(1/k) sum_i y_i", note="Arch/007.md",
            cost=partial(sum_cost, mean=True)))
register(Op(family="merge", variant="concat", params=ConcatParams, module=ConcatMerge, causal="n.a.", shape=_same,
            inputs=-1, paper=PAPER, summary="W [y_1; ...; y_k] + b", note="Arch/007.md", cost=concat_cost))
