"""mixer(fnet): FNet's Fourier token mixing, y = Re(FFT_seq(FFT_hidden(x))), parameter free (Lee-Thorp et al. 2021).

For x [b, n, d]: y[t, c] = Re sum_{s < n} sum_{e < d} x[s, e] exp(-2 pi i s t / n) exp(-2 pi i e c / d), the 2-D
discrete Fourier transform over the sequence and hidden dimensions, real part kept. Every output position sees
every input position, so there is no causal form: FNet is encoder-only.
"""
from __future__ import annotations

import torch
from torch import nn

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
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()  # no half-precision FFT on CPU
        return torch.fft.fft2(work, dim=(-2, -1)).real.to(x.dtype)


OP = register(Op(
    family="mixer", variant="fnet", params=FNetParams, module=FourierMixer, causal="no", shape=fnet_shape,
    paper="FNet: Mixing Tokens with Fourier Transforms, Lee-Thorp et al. 2021, arXiv:2105.03824",
    summary="Re(FFT_seq(FFT_hidden(x))), no parameters",
    note="MHA/FFT/004.md",
))
