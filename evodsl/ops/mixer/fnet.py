"""mixer(fnet): FNet's Fourier token mixing, y = Re(FFT_seq(FFT_hidden(x))), parameter free (Lee-Thorp et al. 2021).

For x [b, n, d]: y[t, c] = Re sum_{s < n} sum_{e < d} x[s, e] exp(-2 pi i s t / n) exp(-2 pi i e c / d), the 2-D
discrete Fourier transform over the sequence and hidden dimensions, real part kept. Every output position sees
every input position, so there is no causal form: FNet is encoder-only.
"""
from __future__ import annotations

import sympy as sp
import torch
from torch import nn

from ...diagnostics import Diagnostic, EvoError
from ..cost import Cost
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register


class FNetParams(OpParams):
    pass


def fnet_shape(p: FNetParams, env: OpEnv):
    if len(env.shape) != 3:
        raise ShapeProblem(f"mixer(fnet) needs a [b, n, d] stream, got [{', '.join(map(str, env.shape))}]")
    return env.shape


class FourierMixer(nn.Module):
    def __init__(self, p: FNetParams, env: OpEnv):
        super().__init__()

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        if ctx is not None and ctx.mask is not None:  # the transform over positions mixes padding into every token
            raise EvoError([Diagnostic(
                "E409", "mixer(fnet) cannot honour a padding mask: its Fourier transform over the sequence mixes "
                        "every position, padding included, into every token",
                help="run each sequence at its own length (batch sequences of equal length), or use attention")])
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()  # no half-precision FFT on CPU
        # .real is a view into the complex result, twice the output's bytes: copy it out so that the complex
        # buffer dies here instead of living as long as the output
        return torch.fft.fft2(work, dim=(-2, -1)).real.to(x.dtype).contiguous()


def cost(p: FNetParams, env: OpEnv, s) -> Cost:
    """No matmuls. A complex FFT of length L costs 5 L log2 L real FLOPs (the radix-2 Cooley-Tukey count):
    b·d FFTs of length n and b·n of length d. Backward: the adjoint transform of the gradient, the same count.
    Nothing is kept for backward. At the inference peak torch holds the input cast to complex and the complex
    result (plus the float32 copy of a half-precision input). Backward: the complex gradient of the result and
    its inverse transform, alive together."""
    fft = 5 * s.b * s.n * s.d * (sp.log(s.n, 2) + sp.log(s.d, 2))
    work = max(4, s.bytes)
    up = work if s.bytes < 4 else 0
    return Cost(fwd_other=fft, bwd_other=fft, peak=s.b * s.n * s.d * (up + 2 * 2 * work - s.bytes),
                bwd_peak=s.b * s.n * s.d * 2 * 2 * work)


OP = register(Op(
    decode=None,
    family="mixer", variant="fnet", params=FNetParams, module=FourierMixer, causal="no", shape=fnet_shape,
    paper="FNet: Mixing Tokens with Fourier Transforms, Lee-Thorp et al. 2021, arXiv:2105.03824",
    padding=False,
    summary="Re(FFT_seq(FFT_hidden(x))), no parameters", cost=cost,
    note="MHA/FFT/004.md",
))
