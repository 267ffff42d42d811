"""residual(deepnorm): DeepNorm (Wang et al. 2022, DeepNet), x_{l+1} = LN(alpha x_l + G_l(x_l)): a post-LN block
whose skip is up-weighted by alpha > 1, with the branch's init shrunk by beta < 1, both from the depth.

    part=single  (encoder-only, N layers; or decoder-only, M = N):  alpha = (2N)^(1/4),   beta = (8N)^(-1/4)
    part=encoder (of an encoder-decoder, N layers, M decoder ones): alpha = 0.81 (N^4 M)^(1/16),
                                                                    beta  = 0.87 (N^4 M)^(-1/16)
    part=decoder (of an encoder-decoder, M layers):                 alpha = (3M)^(1/4),   beta = (12M)^(-1/4)

Written `residual(mha, scale=deepnorm, layers=N) -> norm`: the op takes the branch G(x) and the skip x and returns
alpha x + G(x) (it replaces the residual's add); the LN after it is the spec's post-norm (`norm`, as in the paper:
LayerNorm). `layers` is this stack's layer count (a top-level binding `layers = N` fills it), `decoder_layers` the
decoder's M for part=encoder.

The init: the paper's pseudocode draws the FFN, v and output projections Xavier-normal with gain beta and q, k with
gain 1; the authors' code (torchscale) keeps its initialisation and divides the FFN, v_proj and out_proj parameters
by 1/beta. Here, as in torchscale, the branch's own init is kept and scaled by beta: in the branch this residual
closes (everything between its skip and its add), every ffn's parameters and every attention's v_proj and o_proj
(mha, xattn) are multiplied by beta once, when the model is built (init_branch, called by the torch backend); q_proj,
k_proj, norms and other ops are left as they are. Loading weights afterwards (a checkpoint) overrides it, as any
init."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register


class DeepNormParams(OpParams):
    layers: int = Field(..., ge=1, le=100_000, description="N: this stack's layer count (M for part=decoder)")
    part: Literal["single", "encoder", "decoder"] = Field(
        "single", description="single: encoder- or decoder-only; encoder / decoder: of an encoder-decoder")
    decoder_layers: int | None = Field(None, ge=1, le=100_000, description="M, the decoder's layers (part=encoder)")


def alpha_beta(p: DeepNormParams) -> tuple[float, float]:
    """The paper's alpha (skip weight) and beta (init gain) for this stack."""
    n = p.layers
    if p.part == "single":
        return (2 * n) ** 0.25, (8 * n) ** -0.25
    if p.part == "decoder":
        return (3 * n) ** 0.25, (12 * n) ** -0.25
    nm = n ** 4 * p.decoder_layers
    return 0.81 * nm ** (1 / 16), 0.87 * nm ** (-1 / 16)


def shape(p: DeepNormParams, env: OpEnv):
    if p.part == "encoder" and p.decoder_layers is None:
        raise ShapeProblem("residual(deepnorm, part=encoder) needs the decoder's layer count", "part",
                           "add decoder_layers=M (the encoder's alpha and beta depend on N and M)")
    if p.part != "encoder" and p.decoder_layers is not None:
        raise ShapeProblem(f"decoder_layers is read only with part=encoder, not part={p.part}", "decoder_layers",
                           "drop decoder_layers, or write part=encoder")
    if env.in_shapes[0] != env.in_shapes[1]:
        raise ShapeProblem("residual branch changes the shape", hint="a residual body must keep the stream's shape")
    return env.in_shapes[0]


class DeepNorm(nn.Module):
    def __init__(self, p: DeepNormParams, env: OpEnv):
        super().__init__()
        self.alpha, self.beta = alpha_beta(p)

    def forward(self, fx: torch.Tensor, ctx, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * x + fx

    @torch.no_grad()
    def init_branch(self, modules: list) -> None:
        """beta on the branch's FFN parameters and its attentions' v and output projections."""
        for family, m in modules:
            for name, w in m.named_parameters():
                if family == "ffn" or (family in ("mha", "xattn") and name.split(".")[0] in ("v_proj", "o_proj")):
                    w.mul_(self.beta)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:.4g}, beta={self.beta:.4g}"


def cost(p: DeepNormParams, env: OpEnv, s) -> Cost:
    """No parameters (alpha is a constant). alpha·x + G(x): 2 FLOPs per element; backward: alpha·g for x, g itself
    for G(x), 1 per element. Nothing kept; alpha·x is one [b, n, d] temporary beside the output; backward: alpha·g
    is the one new gradient (G(x)'s is g itself)."""
    elems = s.b * s.n * s.d
    return Cost(params=0, fwd_other=2 * elems, bwd_other=elems, peak=elems * s.bytes, bwd_peak=elems * s.bytes)


OP = register(Op(
    family="residual", variant="deepnorm", params=DeepNormParams, module=DeepNorm, causal="n.a.", inputs=2,
    shape=shape, paper="DeepNet: Scaling Transformers to 1,000 Layers, Wang et al. 2022, arXiv:2203.00555",
    summary="LN(alpha x + G(x)) (the LN written after it), alpha and the branch's init gain beta from the depth",
    cost=cost,
))
