"""longconv(flexconv): FlexConv's continuous kernel convolution with a learned, differentiable kernel size (Romero et
al. 2021, arXiv:2110.08059): a kernel network over the normalised relative position p times a Gaussian mask,

    k(p) = MAGNet_psi(p) * exp(-(p - mu)^2 / (2 sigma^2))       mu, sigma learned (one pair for the layer)
    y_t  = W_o (sum_s k(t - s) * x_s) + b_o                      depthwise, then a pointwise mix; FFT (_ck_fft.py)

The kernel network is the paper's MAGNet by default (kernel=magnet, _magnet.py: L Gabor filters
exp(-gamma_l^2 (p - mu_l)^2 / 2) sin(w_l p + c_l) multiplied into L - 1 linear maps, its init from a Gamma
distribution per layer, `input_scale` its frequencies' scale) or CKConv's SIREN (kernel=siren, _ck_kernel.py, with
`omega_0`; a knob of the other network is refused, E250). The mask's width is the kernel's size: it is learned
with the rest by gradient descent. Choices where the paper is silent or differs: `layers` counts the network's linear maps for
both networks (MAGNet: as many Gabor filters; the authors' no_layers=3 is layers=4 here); the mask is one Gaussian
for every channel, centred at init on the newest token (causal, p = +1) or on lag 0 (bidirectional, p = 0), of
width `sigma` at init, and MAGNet's Gabor windows start around it (within 1.667 sigma, the authors' ratio); the
paper crops the kernel where the mask is below a threshold to save compute, here the FFT runs over every lag (the
masked taps are multiplied, not skipped: the same result up to the threshold, O(b n d log n) whatever the width).
Lags normalised by max_len, padding zeroed before the convolution, decoding keeps every input so far (an explicit
long convolution has no finite state), as ckconv.
"""
from __future__ import annotations

from functools import partial
from typing import Literal

from pydantic import Field

from ..registry import Op, OpEnv, OpParams, ShapeProblem, register, sequence_shape
from ._ck_cost import ck_cost
from ._ck_kernel import ContinuousConv
from ._magnet import MagnetKernel


class FlexConvParams(OpParams):
    kernel: Literal["magnet", "siren"] = Field("magnet", description="the kernel network: MAGNet (the paper's "
                                               "multiplicative Gabor network, _magnet.py) or CKConv's SIREN")
    hidden: int = Field(32, ge=1, le=4096, description="H: the kernel network's width")
    layers: int = Field(3, ge=2, le=8, description="the kernel network's linear maps (MAGNet: as many Gabor filters)")
    omega_0: float = Field(30.0, gt=0, le=1000, description="the sines' frequency scale (kernel=siren)")
    input_scale: float = Field(25.6, gt=0, le=10000, description="the Gabor filters' frequency scale at init "
                                                                 "(kernel=magnet, the authors' input_scale)")
    max_len: int = Field(1024, ge=2, le=1 << 20, description="the lag normalised to p = +-1 (past it: extrapolated)")
    sigma: float = Field(0.5, gt=0, le=100, description="the Gaussian mask's width at init (in p's units)")
    bias: bool = Field(True, description="a bias on the pointwise mix")

def flexconv_shape(p: FlexConvParams, env: OpEnv):
    """The sequence's shape; E250 for a knob of the kernel network not chosen (it would be silently ignored)."""
    other = "input_scale" if p.kernel == "siren" else "omega_0"
    if other in p.model_fields_set:
        owner = "magnet" if other == "input_scale" else "siren"
        raise ShapeProblem(f"{other} is an option of kernel={owner}; this longconv(flexconv) has kernel={p.kernel}",
                           field=other, hint=f"drop {other}, or write kernel={owner}", code="E250")
    return sequence_shape(p, env)


class FlexConv(ContinuousConv):
    def __init__(self, p: FlexConvParams, env: OpEnv):
        net = (MagnetKernel(env.d, p.hidden, p.layers, p.input_scale, p.max_len, env.causal, p.sigma)
               if p.kernel == "magnet" else None)
        super().__init__(env.d, p.hidden, p.layers, p.omega_0, p.max_len, env.causal, p.sigma, p.bias, net)


OP = register(Op(
    decode="every input so far [t, d]: an explicit long convolution has no finite state (grows with the length)",
    family="longconv", variant="flexconv", params=FlexConvParams, module=FlexConv, causal="yes",
    shape=flexconv_shape,
    paper="FlexConv: Continuous Kernel Convolutions with Differentiable Kernel Sizes, Romero et al. 2021, "
          "arXiv:2110.08059",
    summary="k(p) = MAGNet(p) (or SIREN(p)) exp(-(p - mu)^2 / 2 sigma^2), mu and sigma learned (the kernel's "
            "size); y = W_o (k * x) + b_o; FFT O(n d log n)",
    cost=partial(ck_cost, mask=True), note="LongConv/013.md",
))
