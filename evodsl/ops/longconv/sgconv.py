"""longconv(sgconv, max_len=L, kernel_dim=32, alpha=0.5): the structured global convolution SGConv (Li et al. 2022,
"What Makes Convolutional Models Great on Long Sequence Modeling?", arXiv:2210.09298, Sec. 3.2), in the layer S4
uses (_conv_layer.py). Per channel, S = 1 + ceil(log2(L / k)) learned sub-kernels w_i [k] (k = kernel_dim):

    K = cat_i(alpha^i Upsample(w_i, 2^max(i - 1, 0))) / ||K_0||     lengths k, k, 2k, 4k, ...: k 2^(S-1) >= L taps
    y = GELU(K * x + D x) by FFT (_fftconv.py), out = GLU(W y + w)

The parameters, S k d, grow with log L while the kernel spans L taps; the decaying weights alpha^i are the paper's
prior that nearer positions weigh more. Upsampling is linear interpolation (align_corners=false, as the authors'
F.interpolate). ||K_0|| is the norm of each channel's kernel at initialisation, a buffer (the authors' code: the
norm taken once, detached). Taps past k 2^(S-1) are zero, so any n runs (the kernel is built over all its taps:
O(L d), whatever n). Causal: K at lags 0.. ; bidirectional: a second set of sub-kernels for the lags -1.. (the
authors' channels = 2). Decoding: no finite state (an explicit kernel): the history of the inputs [b, d, t], a
step the direct sum over it. Padding: a padded input is zeroed; the kernel does not depend on n.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..registry import Op, OpEnv, OpParams, register, sequence_shape
from ._conv_layer import ConvLayer, first
from ._sgconv_cost import scales, sgconv_cost


class SGConvParams(OpParams):
    max_len: int = Field(ge=1, le=1 << 20, description="L: the taps the kernel spans (past them, zero)")
    kernel_dim: int = Field(32, ge=1, le=4096, description="k: each sub-kernel's parameters")
    alpha: float = Field(0.5, gt=0.0, le=1.0, description="the decay: sub-kernel i weighs alpha^i")
    glu: bool = Field(True, description="the output linear d -> 2d and a GLU (false: d -> d)")


class SGConvLayer(ConvLayer):
    def __init__(self, p: SGConvParams, env: OpEnv):
        super().__init__(env.d, env.causal, p.glu)
        self.alpha, c = p.alpha, 1 if env.causal else 2
        self.w = nn.ParameterList([nn.Parameter(torch.randn(c, env.d, p.kernel_dim))
                                   for _ in range(scales(p.max_len, p.kernel_dim))])
        self.register_buffer("norm", torch.ones(c, env.d, 1))
        with torch.no_grad():
            self.norm.copy_(self.full().norm(dim=-1, keepdim=True))

    def full(self) -> torch.Tensor:
        """The kernel [c, d, k 2^(S-1)], before the normalisation."""
        parts = [w if i < 2 else F.interpolate(w, scale_factor=2 ** (i - 1), mode="linear", align_corners=False)
                 for i, w in enumerate(self.w)]
        return torch.cat([part * self.alpha ** i for i, part in enumerate(parts)], -1)

    def kernels(self, n):
        k = first(self.full() / self.norm, n)
        return (k[0], None) if self.causal else (k[0], k[1])


OP = register(Op(
    decode="the history of its inputs [d, t]: it grows with the length (an explicit kernel has no finite state)",
    family="longconv", variant="sgconv", params=SGConvParams, module=SGConvLayer, causal="yes", shape=sequence_shape,
    paper="What Makes Convolutional Models Great on Long Sequence Modeling?, Li et al. 2022, arXiv:2210.09298",
    summary="K = cat_i(alpha^i Upsample(w_i, 2^max(i-1, 0))) / ||K_0||, S = 1 + ceil(log2(L / k)) sub-kernels; "
            "y = GELU(K * x + D x) by FFT; GLU(W y); O(n log n d)",
    cost=sgconv_cost, note="LongConv/005.md",
))


