"""latent(array, length=L): a learned array of L vectors of width d_model, the same for every sequence of the
batch: Perceiver's latent array (Jaegle et al. 2021), Set Transformer's inducing points (Lee et al. 2019),
memory tokens (Burtsev et al. 2020). It starts a stream of its own (`lat = latent(array, length=256)`) and reads
nothing from its input but the batch size."""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost
from ..registry import Op, OpEnv, OpParams, register


class LatentParams(OpParams):
    length: int = Field(ge=1, le=1 << 20, description="number of learned vectors")
    d_model: int = Field(ge=1, le=1 << 20, description="their width (default: the binding d_model)")


class LatentArray(nn.Module):
    def __init__(self, p: LatentParams, env: OpEnv):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(p.length, p.d_model).normal_(0.0, 0.02))

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        if ctx is not None:
            ctx.mask, ctx.right_padded = None, False  # every latent is real
        return self.weight.unsqueeze(0).repeat(x.shape[0], 1, 1)


def cost(p: LatentParams, env: OpEnv, s) -> Cost:
    """A copy of the array per sequence (no FLOP); backward sums the b copies' gradients into it. Its input
    gives only the batch size: no gradient flows back to it."""
    L, d = s.sym("L", p.length), s.sym("d", p.d_model)
    return Cost(params=L * d, bwd_other=s.b * L * d, bwd_peak=0)


OP = register(Op(
    family="latent", variant="array", params=LatentParams, module=LatentArray, causal="n.a.",
    shape=lambda p, env: (env.shape[0], p.length, p.d_model),
    starts=True,
    paper="Perceiver: General Perception with Iterative Attention, Jaegle et al. 2021, arXiv:2103.03206",
    summary="L learned vectors [L, d], one copy per sequence: [b, L, d]", cost=cost,
))
