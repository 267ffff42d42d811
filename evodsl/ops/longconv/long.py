"""longconv(long, max_len=L, smooth=3, lam=0.001): the simple long convolution of Fu et al. 2023 ("Simple
Hardware-Efficient Long Convolutions for Sequence Modeling", arXiv:2302.06646), in the layer S4 uses (_conv_layer.py),
per channel c of x = u^T [b, d, n]:

    K = kernel [d, L]                                 a learned tap per lag and channel (L = max_len)
    K_k <- (2p + 1)^-1 sum_{|j| <= p} K_{k+j}         smooth: an average pool of width 2p + 1 = smooth, zeros past the ends
    K <- sign(K) max(|K| - lam, 0)                    squash: soft-thresholding
    y = GELU(K * x + D x) by FFT (_fftconv.py), out = GLU(W y + w)

O(d n log n) for the convolution; the kernel's d L parameters are read to the first n taps, so a sequence is at most
L long (E410 beyond). Causal: the taps at lags 0..L-1. Bidirectional: a second kernel for the lags -1..-L (the
paper's 2n - 1 taps a channel), smoothed and squashed alone. Choices where the paper is silent: the init is the
authors' random one (N(0, 0.002^2)); lam = 0.001 keeps most of those taps (the authors' code defaults lam 0.1
with that init, which zeroes every tap); smoothing is on by default (p = 1). Decoding: no finite state (an explicit
kernel of length n): the history of the layer's inputs [b, d, t] is kept (it grows with t), and a step is the
direct sum over it, O(t d) a token. Padding: a padded input is zeroed; the kernel does not depend on n.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..registry import Op, OpEnv, OpParams, ShapeProblem, register, sequence_shape
from ._conv_layer import ConvLayer, check_length, first
from ._long_cost import long_cost


class LongParams(OpParams):
    max_len: int = Field(ge=1, le=1 << 20, description="L: the kernel's taps, the longest sequence")
    smooth: int = Field(3, ge=1, le=63, description="2p + 1: the average pool's width (odd; 1: no smoothing)")
    lam: float = Field(0.001, ge=0.0, le=1.0, description="the soft threshold")
    glu: bool = Field(True, description="the output linear d -> 2d and a GLU (false: d -> d)")


def long_shape(p: LongParams, env: OpEnv):
    if p.smooth % 2 == 0:
        raise ShapeProblem(f"smooth={p.smooth} is even: the average pool is centred", "smooth", "give an odd width")
    return sequence_shape(p, env)


class LongConvLayer(ConvLayer):
    def __init__(self, p: LongParams, env: OpEnv):
        super().__init__(env.d, env.causal, p.glu)
        self.max_len, self.width, self.lam = p.max_len, p.smooth, p.lam
        self.kernel = nn.Parameter(torch.randn(1 if env.causal else 2, env.d, p.max_len) * 0.002)

    def kernels(self, n):
        check_length("longconv(long)", n, self.max_len)
        p = self.width // 2
        k = first(self.kernel, n + p)  # the taps the first n smoothed ones read: O(n), not O(L)
        if p:
            k = first(F.avg_pool1d(k, self.width, stride=1, padding=p), n)
        k = F.relu(k.abs() - self.lam) * k.sign()
        return (k[0], None) if self.causal else (k[0], k[1])


OP = register(Op(
    decode="the history of its inputs [d, t]: it grows with the length (an explicit kernel has no finite state)",
    family="longconv", variant="long", params=LongParams, module=LongConvLayer, causal="yes", shape=long_shape,
    paper="Simple Hardware-Efficient Long Convolutions for Sequence Modeling, Fu et al. 2023, arXiv:2302.06646",
    summary="K = squash(smooth(kernel[:, :n])), sign(K) max(|K| - lam, 0) after an average pool; "
            "y = GELU(K * x + D x) by FFT; GLU(W y); O(n log n d)",
    cost=long_cost, note="LongConv/009.md",
))
