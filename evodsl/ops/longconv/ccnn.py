"""longconv(ccnn): the residual block of the Continuous CNN (Knigge, Romero et al. 2022, Towards a General Purpose
CNN for Long Range Dependencies in ND, arXiv:2206.03398), in its 1-D (sequence) case, as the authors' S4-style
block:

    u = Norm(x)
    v = SepFlexConv(u) = W_1 (k * u) + b_1           FlexConv's kernel (longconv(flexconv)), depthwise, then pointwise
    z = W_2 Dropout(GELU(v)) + b_2                    the pointwise linear
    y = x + GELU(z)                                   the residual, inside the op

The op is the whole block (norm and residual included): a CCNN is `longconv(ccnn) -> longconv(ccnn) -> ...` after
an embedding, without residual(...) around it, e.g.

    model m(causal=true) = input(features, d=8) -> embed(linear, d_model=64) -> longconv(ccnn) -> longconv(ccnn)
        -> norm -> head(linear, d_out=10)

Choices where the paper is silent or differs: the norm is a LayerNorm over the channels (the paper's BatchNorm
mixes the batch, and padding, into every token's statistics: LayerNorm keeps a padded batch equal to each sequence
alone and decodes token by token); the kernel generator is SIREN (not MAGNet), omega_0 = 30, the mask's width
sigma at init, as longconv(flexconv); dropout after the first GELU as the authors' block (default 0). Causal: the
FlexConv kernel over the past (the newest token at p = +1); bidirectional: over every lag. FFT convolution
O(b n d log n + b n d^2); decoding keeps every input of the convolution so far (no finite state).
"""
from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..registry import Op, OpEnv, OpParams, register, sequence_shape
from ._ccnn_cost import ccnn_cost
from ._ck_kernel import ContinuousConv


class CCNNParams(OpParams):
    hidden: int = Field(32, ge=1, le=4096, description="H: the kernel network's width")
    layers: int = Field(3, ge=2, le=8, description="the kernel network's linear maps (sines between them)")
    omega_0: float = Field(30.0, gt=0, le=1000, description="the sines' frequency scale (SIREN)")
    max_len: int = Field(1024, ge=2, le=1 << 20, description="the lag normalised to p = +-1 (past it: extrapolated)")
    sigma: float = Field(0.5, gt=0, le=100, description="the Gaussian mask's width at init (in p's units)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout after the first GELU (training only)")
    eps: float = Field(1e-5, gt=0, le=1, description="the LayerNorm's epsilon")


class CCNNBlock(nn.Module):
    def __init__(self, p: CCNNParams, env: OpEnv):
        super().__init__()
        d = env.d
        self.norm = nn.LayerNorm(d, eps=p.eps)
        self.conv = ContinuousConv(d, p.hidden, p.layers, p.omega_0, p.max_len, env.causal, p.sigma, True)
        self.out = nn.Linear(d, d)
        self.dropout = nn.Dropout(p.dropout) if p.dropout > 0 else None

    def forward(self, x, ctx=None):
        v = F.gelu(self.conv(self.norm(x), ctx))
        if self.dropout is not None:
            v = self.dropout(v)
        return x + F.gelu(self.out(v))


OP = register(Op(
    decode="every input of its convolution so far [t, d]: an explicit long convolution has no finite state",
    family="longconv", variant="ccnn", params=CCNNParams, module=CCNNBlock, causal="yes", shape=sequence_shape,
    paper="Towards a General Purpose CNN for Long Range Dependencies in ND (CCNN), Knigge, Romero et al. 2022, "
          "arXiv:2206.03398",
    summary="x + GELU(W_2 GELU(SepFlexConv(LayerNorm(x))) + b_2): FlexConv's masked SIREN kernel, depthwise by FFT, "
            "then pointwise; the block's norm and residual inside; O(n d log n + n d^2)",
    cost=ccnn_cost, note="LongConv/014.md",
))
