"""residual(admin): Admin (Liu, Liu, Gao, Chen, Han 2020, "Understanding the Difficulty of Training Transformers"),
a post-LN block whose skip is weighted channel by channel by a learned omega_i in R^d:

    x_i = LN(b_i),   b_i = x_{i-1} * omega_i + F_i(x_{i-1}),   omega_i(0) = sqrt(sum_{j<i} Var[F_j(x_{j-1})])

Written `residual(mha, scale=admin, sublayer=1) -> norm -> residual(ffn, scale=admin, sublayer=2) -> norm`: the op
takes the branch F(x) and the skip x and returns omega * x + F(x) (it replaces the residual's add); the LN after
it is the spec's post-norm.

A documented simplification of the init: the paper sets omega_i from a profiling pass (one forward of a batch
through the model at its default init, recording each sublayer's output variance). No pass runs at build time;
instead every variance is taken as 1. The authors' profiling code (Transformer-Clinic) runs the recursion
omega_1 = 1, omega_{i+1} = sqrt(Var[x_{i-1} omega_i] + Var[F_i]), numbering layer l's attention 2l + 1 and its FFN
2l + 2 (a decoder's three, per_layer=3, counted likewise: our reading); with unit variances (an LN'd or
embedded input, default-init sublayer outputs of order 1) it gives omega_i(0) = sqrt(i), i the sublayer's index
in the stack counted from 1. i = per_layer * l + sublayer, l the layer: a repeat's copy index (the torch backend
tells each copy, init_copy; 0 outside a repeat, and in a shared body), `sublayer` the position in the layer,
`per_layer` 2 for an encoder layer, 3 for a decoder's. Load profiled omegas as weights to get Admin proper."""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register


class AdminParams(OpParams):
    sublayer: int = Field(1, ge=1, le=100_000, description="the sublayer's place in its layer, from 1 (outside "
                                                           "a repeat: in the stack)")
    per_layer: int = Field(2, ge=1, le=64, description="sublayers per layer: 2 (encoder), 3 (decoder)")


def omega0(p: AdminParams, layer: int = 0) -> float:
    """omega_i(0) = sqrt(i), i = per_layer * layer + sublayer (every variance term taken as 1)."""
    return math.sqrt(p.per_layer * layer + p.sublayer)


def shape(p: AdminParams, env: OpEnv):
    if env.in_shapes[0] != env.in_shapes[1]:
        raise ShapeProblem("residual branch changes the shape", hint="a residual body must keep the stream's shape")
    return env.in_shapes[0]


class Admin(nn.Module):
    def __init__(self, p: AdminParams, env: OpEnv):
        super().__init__()
        self.p = p
        self.omega = nn.Parameter(torch.full((env.d,), omega0(p)))

    @torch.no_grad()
    def init_copy(self, layer: int) -> None:
        """In a repeat's copy `layer`: omega(0) = sqrt(per_layer * layer + sublayer)."""
        self.omega.fill_(omega0(self.p, layer))

    def forward(self, fx: torch.Tensor, ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(fx, x, self.omega)


def cost(p: AdminParams, env: OpEnv, s) -> Cost:
    """d parameters. omega·x + F(x): 2 FLOPs per element; backward: omega·g for x (1), sum over tokens of g·x for
    omega (2), g itself for F(x): 3 per element. It keeps its input x (the skip) for omega's gradient. Backward's
    peak: omega·g, the one new [b, n, d] gradient, and a [d] reduction beside it."""
    elems = s.b * s.n * s.d
    return Cost(params=s.d, fwd_other=2 * elems, bwd_other=3 * elems, saves_input=True,
                bwd_peak=(elems + s.d) * s.bytes)


OP = register(Op(
    family="residual", variant="admin", params=AdminParams, module=Admin, causal="n.a.", inputs=2, shape=shape,
    paper="Understanding the Difficulty of Training Transformers, Liu et al. 2020, arXiv:2004.08249",
    summary="LN(omega * x + F(x)) (the LN written after it), omega in R^d learned, omega(0) = sqrt(i) for the "
            "i-th sublayer (profiling replaced by unit variances)",
    note="Normalize_And_Residual/008.md", cost=cost,
))
