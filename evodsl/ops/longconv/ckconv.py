"""longconv(ckconv, hidden=32): the continuous kernel convolution of CKConv (Romero et al. 2021, arXiv:2102.02611):
a convolution whose kernel is a function of the relative position, produced by a small network, so that one set
of weights gives a kernel as long as the sequence,

    k(p)  = SIREN_psi(p)                              p = the lag normalised by max_len (_ck_kernel.py)
    y_t   = W_o (sum_s k(t - s) * x_s) + b_o          depthwise (one kernel per channel), then a pointwise mix

causal: s <= t (the kernel over lags 0 .. n - 1, the newest token at p = +1, as CKConv's causal layout);
bidirectional: every s (lags -(n - 1) .. n - 1, lag 0 at p = 0). Computed by FFT (_ck_fft.py): O(b n d log n) for
the convolution, O(n H^2 + n H d) for the kernel at 2 n lags, O(b n d^2) for the mix.
Choices where the paper is silent or differs: the paper's kernel maps each (out, in) channel pair; here it is
depthwise followed by the pointwise mix (the separable form of its successors FlexConv / CCNN; a pair kernel would
make the convolution O(b n d^2 log n)); positions are normalised by a fixed max_len (the paper normalises by the
training length), so that a token's kernel does not change with the sequence's length: decoding and padding give
the forward's outputs, and past max_len the kernel extrapolates. omega_0 = 30 and SIREN's init (CKConv's sine
nets), the last layer scaled by 1 / sqrt(max_len).
Padding: a padded position is zeroed before the convolution, so it enters no output, on either side (a lag does
not depend on where the row starts). Decoding (causal): an explicit long convolution has no finite state; the step
keeps every input so far [b, t, d] (it grows with the length, as a KV cache) and convolves the new tokens with it.
"""
from __future__ import annotations

from pydantic import Field

from ..registry import Op, OpEnv, OpParams, register, sequence_shape
from ._ck_cost import ck_cost
from ._ck_kernel import ContinuousConv


class CKConvParams(OpParams):
    hidden: int = Field(32, ge=1, le=4096, description="H: the kernel network's width")
    layers: int = Field(3, ge=2, le=8, description="the kernel network's linear maps (sines between them)")
    omega_0: float = Field(30.0, gt=0, le=1000, description="the sines' frequency scale (SIREN)")
    max_len: int = Field(1024, ge=2, le=1 << 20, description="the lag normalised to p = +-1 (past it: extrapolated)")
    bias: bool = Field(True, description="a bias on the pointwise mix")


class CKConv(ContinuousConv):
    def __init__(self, p: CKConvParams, env: OpEnv):
        super().__init__(env.d, p.hidden, p.layers, p.omega_0, p.max_len, env.causal, None, p.bias)


OP = register(Op(
    decode="every input so far [t, d]: an explicit long convolution has no finite state (grows with the length)",
    family="longconv", variant="ckconv", params=CKConvParams, module=CKConv, causal="yes", shape=sequence_shape,
    paper="CKConv: Continuous Kernel Convolution For Sequential Data, Romero et al. 2021, arXiv:2102.02611",
    summary="k(p) = SIREN(p) over normalised lags; y = W_o (k * x) + b_o, depthwise then pointwise; FFT O(n d log n)",
    cost=ck_cost, note="LongConv/012.md",
))
