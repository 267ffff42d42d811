"""norm(rmsnorm): y = x / sqrt(mean(x^2) + eps) * g over the last dimension; no re-centring, no bias.

offset=1 stores the gain as g = 1 + w (Gemma's RMSNorm: w starts at 0, and weight decay pulls g towards 1):
the same function, another parametrisation, so that such checkpoints load as they are."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..cost import Cost
from ..registry import Op, OpEnv, OpParams, register


class RMSNormParams(OpParams):
    eps: float = Field(1e-6, gt=0.0, lt=1.0, description="added to mean(x^2); 1e-6 as in LLaMA")
    offset: float = Field(0.0, ge=0.0, le=1.0, description="the gain is offset + w (Gemma: 1)")


class RMSNorm(nn.Module):
    def __init__(self, p: RMSNormParams, env: OpEnv):
        super().__init__()
        self.eps, self.offset = p.eps, p.offset
        self.weight = nn.Parameter(torch.full((env.d,), 1.0 - p.offset))  # a gain of 1 at the start

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        gain = self.weight + self.offset if self.offset else self.weight
        return F.rms_norm(x, x.shape[-1:], gain, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}" + (f", offset={self.offset:g}" if self.offset else "")


def cost(p: RMSNormParams, env: OpEnv, s) -> Cost:
    """Per element: square, sum, normalise, scale g: 4 FLOPs; backward ~2x.

    F.rms_norm is composite on CPU (torch 2.13), computed in at least float32: it keeps the input (below
    float32: its float32 copy instead), rstd [b, n] and the normalised x·rstd [b, n, d] for g's gradient; at its
    peak x·rstd and rstd are alive beside the output (below float32: the copy, rstd, x·rstd and the float32
    result, before the output is cast down). Its backward, composite too: at its peak four [b, n, d]
    temporaries in the compute dtype, rstd released. offset: the gain offset + w, one more [d] (d additions),
    kept for backward."""
    work = max(4, s.bytes)  # bytes of the compute dtype
    up = s.b * s.n * s.d * work if s.bytes < 4 else 0  # the float32 copy of a half-precision input
    kept = s.b * s.n * (s.d + 1) * work  # x·rstd and rstd
    gain = s.d if p.offset else 0
    return Cost(params=s.d, fwd_other=4 * s.b * s.n * s.d + gain, bwd_other=8 * s.b * s.n * s.d + gain,
                saves_input=s.bytes >= 4, saved=kept + up + gain * s.bytes,
                peak=kept + (2 * up - s.b * s.n * s.d * s.bytes if up else 0), bwd_peak=s.b * s.n * (4 * s.d - 1) * work)


OP = register(Op(
    family="norm", variant="rmsnorm", params=RMSNormParams, module=RMSNorm, causal="n.a.",
    paper="Root Mean Square Layer Normalization, Zhang & Sennrich 2019, arXiv:1910.07467",
    summary="x / sqrt(mean(x^2) + eps) * g", cost=cost,
    note="Others/002.md",  # Narang et al. 2021: across implementations, RMSNorm transfers best
))
