"""ssm(s4d, N=64): the diagonal state-space layer S4D (Gu, Gupta, Goel and Re 2022, arXiv:2206.11893), as the
authors' S4D module (state-spaces/s4 models/s4/s4d.py), per channel c of x = u^T [b, d, n]:

    A = -exp(log_A_real) + i A_imag  [d, N/2]         S4D-Lin init: A_j = -1/2 + i pi j
    dA = exp(dt A), B_bar = (dA - 1) / A              zero-order hold, dt = exp(log_dt), log-uniform in [1e-3, 0.1]
    K_l = 2 Re(sum_j C_j B_bar_j dA_j^l)              the Vandermonde kernel (_s4d_kernel.py), l < n
    y = GELU(K * x + D x)                             by FFT (_fftconv.py), O(d n log n)
    out = GLU(W y + w)                                the layer's output linear (glu=false: W y + w)

N is the real state size: N/2 complex modes in conjugate pairs (B = 1 folded into C, as the authors' code).
Causal: the recurrence h_t = dA h_{t-1} + x_t, y_t = 2 Re(C B_bar . h_t) is the same map; the step form keeps h
[b, d, N/2] complex (as (re, im) pairs, b d N reals): a piece of m tokens adds its FFT convolution to what the state
contributes (2 Re(C B_bar dA^(l+1) h)) and advances h by a Vandermonde product, no loop over tokens.
Bidirectional: two kernels sharing A and dt (two C), the second on the anticausal lags, as the authors' code
(channels=2). Padding: a padded position's input is zeroed, so it enters neither state nor convolution.
"""
from __future__ import annotations

import torch
from pydantic import Field

from ...decode import slot
from ..longconv._conv_layer import ConvLayer
from ..longconv._fftconv import fft_conv
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register, sequence_shape
from ._s4d_cost import s4d_cost
from ._s4d_kernel import DiagonalKernel


class S4DParams(OpParams):
    N: int = Field(64, ge=2, le=1024, description="the real state size per channel (N/2 complex modes; even)")
    glu: bool = Field(True, description="the output linear d -> 2d and a GLU (false: d -> d)")


def s4d_shape(p: S4DParams, env: OpEnv):
    if p.N % 2:
        raise ShapeProblem(f"N={p.N} is odd: S4D's modes come in conjugate pairs", "N", "give an even N")
    return sequence_shape(p, env)


class S4DLayer(ConvLayer):
    def __init__(self, p: S4DParams, env: OpEnv):
        super().__init__(env.d, env.causal, p.glu)
        self.kernel = DiagonalKernel(env.d, p.N, 1 if env.causal else 2)

    def kernels(self, n):
        K = self.kernel(n)
        return (K[0], None) if self.causal else (K[0], K[1])

    def step(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """From the cached state h (b d N/2 complex) to the outputs of the m new inputs and the next state."""
        key = slot(ctx, self)
        past = ctx.cache.caches.get(key)
        h = None if past is None else torch.view_as_complex(past[0])
        y = fft_conv(x, self.kernel(x.shape[-1])[0])
        if h is not None:
            y = y + self.kernel.from_state(h, x.shape[-1]).to(y.dtype)
        ctx.cache.caches[key] = (torch.view_as_real(self.kernel.advance(h, x)),)
        return y


OP = register(Op(
    decode="the diagonal state h [d, N/2] complex (b d N reals): constant in the length",
    family="ssm", variant="s4d", params=S4DParams, module=S4DLayer, causal="yes", shape=s4d_shape,
    paper="On the Parameterization and Initialization of Diagonal State Space Models, Gu et al. 2022, "
          "arXiv:2206.11893",
    summary="K_l = 2 Re(C B_bar exp(dt A)^l), A diagonal complex (S4D-Lin), ZOH; y = GELU(K * x + D x) by FFT; "
            "GLU(W y); O(n log n d + n N d)",
    cost=s4d_cost, note="",
))
