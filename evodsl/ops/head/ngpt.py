"""head(ngpt): the normalized Transformer's output (Loshchilov et al. 2024, nGPT, arXiv:2410.01131, section 2.2,
eq. 3): logits z = s_z * (E h), E in R^{V x d} its own table (untied, as the authors' code: the input embedding and
this one are separate, each row unit-norm along d under evodsl.ngpt_normalize_), s_z in R^V learned, stored at
sz_scale (default 1/sqrt(d)) and used as stored * (sz_init / sz_scale), starting at sz_init = 1 (the scale the
cosines E h need to become logits)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..cost import Cost, linear
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register


class NgptHeadParams(OpParams):
    sz_init: float = Field(1.0, gt=0, le=1000, description="s_z's starting value")
    sz_scale: float | None = Field(None, gt=0, le=1, description="s_z's stored init; default 1/sqrt(d)")


def _shape(p: NgptHeadParams, env: OpEnv):
    if env.vocab is None:
        raise ShapeProblem("head(ngpt) predicts tokens, but the model's input is not input(tokens, vocab=V)",
                           hint="use head(linear, d_out=...) for continuous outputs")
    if len(env.shape) != 3:
        raise ShapeProblem("head(ngpt) needs a [b, n, d] stream")
    return (*env.shape[:-1], env.vocab)


class NgptHead(nn.Module):
    def __init__(self, p: NgptHeadParams, env: OpEnv):
        super().__init__()
        scale = p.sz_scale if p.sz_scale is not None else env.d ** -0.5
        self.weight = nn.Parameter(torch.empty(env.vocab, env.d).normal_(0.0, 0.02))
        self.sz = nn.Parameter(torch.full((env.vocab,), scale))
        self.gain = p.sz_init / scale

    def forward(self, h: torch.Tensor, ctx=None) -> torch.Tensor:
        return F.linear(h, self.weight) * (self.sz * self.gain)


def cost(p: NgptHeadParams, env: OpEnv, s) -> Cost:
    """The logits matmul, 2 b n d V; d V + V parameters. s_z's gain (V) and the product (1 a logit); backward 2 a
    logit. Kept: E h (s_z's gradient) and s_z times its gain [V]; the inference peak, those beside the logits; the
    backward's, E h's gradient (a [b, n, V] tensor)."""
    V = s.sym("V", env.vocab)
    c = linear(s, s.d, V, False)
    logits = s.b * s.n * V
    return Cost(params=c.params + V, fwd=c.fwd, bwd=c.bwd, fwd_other=logits + V, bwd_other=2 * logits,
                saves_input=True, saved=(logits + V) * s.bytes, peak=(logits + V) * s.bytes, bwd_peak=logits * s.bytes)


OP = register(Op(
    family="head", variant="ngpt", params=NgptHeadParams, module=NgptHead, causal="n.a.", shape=_shape,
    paper="nGPT: Normalized Transformer with Representation Learning on the Hypersphere, Loshchilov et al. 2024, "
          "arXiv:2410.01131",
    summary="logits = s_z * (E h), E untied (rows unit-norm under ngpt_normalize_), s_z in R^V learned", cost=cost,
))
