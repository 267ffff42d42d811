"""ssm(bigs, N=64, expand=3): the gated bidirectional SSM layer of BiGS (Wang et al. 2022, "Pretraining Without
Attention", arXiv:2212.10544, Sec. 3, Fig. 2 "BiGS"), as a sublayer (the paper's LayerNorm before it and the residual
after it are the model's), for X [b, n, d]:

    V = GELU(W_v X)                     [n, E], E = expand d (the paper's 3d)
    F = GELU(W_f X),  B = GELU(W_b Flip(X))                 [n, d] each
    U_l = S4(F),  U_r = S4(B)           two S4D layers (_s4d_kernel.py: y = K * x + D x, by FFT), their own A, dt, C, D
    U = GELU(W_u (U_l * Flip(U_r)))     [n, E]
    O = W_o (U * V)                     [n, d]

Flip reverses the sequence: Flip(S4(Flip(.))) is the anticausal S4, so the two branches read the past and the future
and meet multiplicatively. The S4 inside is the diagonal S4D kernel (the paper used S4; S4D is its diagonal
simplification, the base of this family here). Bidirectional only: the backward branch reads every later token, and
the paper gives no causal form. Padding: a padded position's input to each S4 is zeroed (before the flip), and the
convolutions are shift-invariant, so a padded row equals the sequence alone on either side.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..longconv._conv_layer import keep_mask, zero_padding
from ..longconv._fftconv import fft_conv
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register, sequence_shape
from ._bigs_cost import bigs_cost
from ._s4d_kernel import DiagonalKernel


class BiGSParams(OpParams):
    N: int = Field(64, ge=2, le=1024, description="each S4D's real state size per channel (N/2 complex modes; even)")
    expand: int = Field(3, ge=1, le=16, description="E = expand d: the width of V and U")


def bigs_shape(p: BiGSParams, env: OpEnv):
    if p.N % 2:
        raise ShapeProblem(f"N={p.N} is odd: S4D's modes come in conjugate pairs", "N", "give an even N")
    return sequence_shape(p, env)


class BiGSLayer(nn.Module):
    def __init__(self, p: BiGSParams, env: OpEnv):
        super().__init__()
        d, E = env.d, p.expand * env.d
        self.v, self.f, self.b = nn.Linear(d, E), nn.Linear(d, d), nn.Linear(d, d)
        self.u, self.o = nn.Linear(d, E), nn.Linear(E, d)
        self.kernel_f, self.kernel_b = DiagonalKernel(d, p.N), DiagonalKernel(d, p.N)
        self.D_f, self.D_b = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        keep, n = keep_mask(ctx, False), x.shape[1]
        f = zero_padding(F.gelu(self.f(x)).transpose(1, 2), keep)  # [b, d, n]
        back = zero_padding(F.gelu(self.b(x.flip(1))).transpose(1, 2), None if keep is None else keep.flip(1))
        left = fft_conv(f, self.kernel_f(n)[0]) + f * self.D_f[:, None]
        right = fft_conv(back, self.kernel_b(n)[0]) + back * self.D_b[:, None]
        del f, back
        u = F.gelu(self.u((left * right.flip(-1)).transpose(1, 2)))
        return self.o(u * F.gelu(self.v(x)))


OP = register(Op(
    decode=None,
    family="ssm", variant="bigs", params=BiGSParams, module=BiGSLayer, causal="no", shape=bigs_shape,
    paper="Pretraining Without Attention, Wang et al. 2022, arXiv:2212.10544",
    summary="V = GELU(W_v X); U_l = S4(GELU(W_f X)); U_r = S4(GELU(W_b Flip(X))); "
            "O = W_o(GELU(W_u(U_l * Flip(U_r))) * V); S4D kernels by FFT, O(n log n d + n N d)",
    cost=bigs_cost, note="LongConv/004.md",
))
