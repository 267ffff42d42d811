"""residual(ngpt): the normalized Transformer's update (Loshchilov, Hsieh, Sun & Ginsburg 2024, nGPT: Normalized
Transformer with Representation Learning on the Hypersphere, arXiv:2410.01131, eq. 10-11):

    h <- Norm(h + alpha (Norm(F(h)) - h)),     Norm(x) = x / ||x||_2,   alpha in R^d learned

a step from the hidden state h (on the unit sphere) towards the branch's normalised output, alpha its per-channel
"eigen learning rate". Written `residual(mha(ngpt), scale=ngpt)`: the op takes the branch F(h) and the skip h and
returns the new h (it replaces the residual's add; no norm is written after it: Norm is part of the update).
The paper's parametrisation (section 2.6, and the authors' code): alpha is stored as a vector initialised to
alpha_scale (default 1/sqrt(d)) and used as alpha_stored * (alpha_init / alpha_scale), so that it starts at
alpha_init (0.05, the paper's value for attention and MLP, about 1/layers) while an optimiser sees a parameter of
the scale of the others. Norm uses F.normalize's eps (1e-12) against a zero vector.

The rest of nGPT: every matrix of its ops unit-norm along its d_model axis after each optimiser step
(evodsl.ngpt_normalize_(model); `init=ngpt` does it at the start), mha(ngpt) (normalised q, k scaled by s_qk,
softmax scale sqrt(dh)), ffn(ngpt) (s_u, s_v), head(ngpt) (s_z); no norm ops (specs/ngpt_small.evo).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..cost import Cost
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register


class NgptResidualParams(OpParams):
    alpha_init: float = Field(0.05, gt=0, le=1, description="alpha's starting value (the eigen learning rate)")
    alpha_scale: float | None = Field(None, gt=0, le=1, description="the stored parameter's init; default 1/sqrt(d)")


def shape(p: NgptResidualParams, env: OpEnv):
    if env.in_shapes[0] != env.in_shapes[1]:
        raise ShapeProblem("residual branch changes the shape", hint="a residual body must keep the stream's shape")
    return env.in_shapes[0]


class NgptResidual(nn.Module):
    def __init__(self, p: NgptResidualParams, env: OpEnv):
        super().__init__()
        scale = p.alpha_scale if p.alpha_scale is not None else env.d ** -0.5
        self.alpha = nn.Parameter(torch.full((env.d,), scale))
        self.gain = p.alpha_init / scale  # alpha = stored * alpha_init / alpha_scale

    def forward(self, fx: torch.Tensor, ctx, h: torch.Tensor) -> torch.Tensor:
        step = F.normalize(fx, dim=-1) - h
        return F.normalize(h + (self.alpha * self.gain) * step, dim=-1)

    def extra_repr(self) -> str:
        return f"d={self.alpha.numel()}, gain={self.gain:.4g}"


def cost(p: NgptResidualParams, env: OpEnv, s) -> Cost:
    """d parameters. Per element (E = b n d): the two normalisations (square, sum, divide: 3 each), the difference,
    alpha's product and the sum (3), alpha times its gain (d); backward about twice that. Kept (measured): the step
    Norm(F(h)) - h (alpha's gradient) and the sum, F(h)'s and the sum's norms and clamped norms [b, n, 1] each, and
    alpha times its gain [d] (F(h) and h are the inputs). The inference peak: two [b, n, d] temporaries and a row of
    norms beside the output; the backward's: the gradients of the sum, the step, F(h) and h."""
    E, by = s.b * s.n * s.d, s.bytes
    rows = s.b * s.n
    return Cost(params=s.d, fwd_other=9 * E + s.d, bwd_other=18 * E, saved=2 * E * by + (4 * rows + s.d) * by,
                peak=(2 * E + rows) * by, bwd_peak=4 * E * by, saves_input=True)


OP = register(Op(
    family="residual", variant="ngpt", params=NgptResidualParams, module=NgptResidual, causal="n.a.", inputs=2,
    shape=shape, paper="nGPT: Normalized Transformer with Representation Learning on the Hypersphere, Loshchilov "
                       "et al. 2024, arXiv:2410.01131",
    summary="Norm(h + alpha (Norm(F(h)) - h)), Norm(x) = x / ||x||, alpha in R^d learned (the eigen learning rate)",
    cost=cost,
))
