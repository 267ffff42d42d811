"""ssm(mamba, N=16, expand=2, conv=4, dt_rank=auto): the selective state-space layer of Mamba (Gu and Dao 2023,
arXiv:2312.00752, Algorithm 2 and Section 3.6), as a sublayer (the block's norm and residual are the model's):

    x, z   = in_proj(u)                                  [b, n, E] each, E = expand d
    x      = silu(conv1d(x))                             depthwise, causal (kernel k = conv, k - 1 zeros before)
    dt, B, C = x_proj(x)                                 [R], [N], [N]   (R = dt_rank; auto = ceil(d / 16))
    dt     = softplus(dt_proj(dt))                       [b, n, E]
    A      = -exp(A_log)                                 [E, N], S4D-real init A_log[e, n] = log(n + 1)
    h_t    = exp(dt_t A) * h_{t-1} + (dt_t B_t) * x_t    per channel e and state n (dA by zero-order hold, dB x by
                                                         Euler, as the paper's implementation)
    y_t    = C_t . h_t + D * x_t
    out    = out_proj(y * silu(z))

The scan is chunked (_mamba_scan.py): an autograd Function over chunks of T = chunk tokens, the states of one chunk
at a time in reused buffers, O(n E N); training keeps a state a chunk and the backward recomputes each chunk's
states from it and runs the reverse recurrence; the result does not depend on T. Causal only (the recurrence is the op); the
step form keeps the convolution's last k - 1 inputs [b, E, k - 1] and the state h [b, E, N], whatever the length:
a prefill and a single step run the same code from that state. The ONNX export (a symbolic n) runs a doubling scan
over the whole sequence instead (exported_scan: 16 levels, exact for n <= 65536). Choices where the paper is silent, as HF's
MambaMixer and state-spaces/mamba: biases on the convolution and dt_proj only (bias= adds them to in_proj and
out_proj), dt_proj's bias is softplus^-1 of a log-uniform draw in [0.001, 0.1] (floor 1e-4), its weight uniform
in +-R^-0.5, D = 1. Padding: a padded position enters neither the state (dt = 0: decay 1, no input) nor the
convolution (its input zeroed), so a padded row equals the sequence alone on either side.
"""
from __future__ import annotations

import math
from typing import Literal, Union

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...decode import slot
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register, sequence_shape
from ._mamba_cost import mamba_cost
from ._mamba_scan import exported_scan, selective_scan


class MambaParams(OpParams):
    N: int = Field(16, ge=1, le=1024, description="the state size per channel")
    expand: int = Field(2, ge=1, le=16, description="E = expand d: the inner width")
    conv: int = Field(4, ge=1, le=64, description="k: the causal depthwise convolution's kernel")
    dt_rank: Union[int, Literal["auto"]] = Field("auto", description="R: dt's low rank; auto = ceil(d / 16)")
    chunk: int = Field(32, ge=1, le=4096, description="T: tokens per chunk of the scan (the result is the same)")
    bias: bool = Field(False, description="biases on in_proj and out_proj")
    conv_bias: bool = Field(True, description="a bias on the convolution")


def rank(p: MambaParams, d: int) -> int:
    return math.ceil(d / 16) if p.dt_rank == "auto" else p.dt_rank


def mamba_shape(p: MambaParams, env: OpEnv):
    shape = sequence_shape(p, env)
    if not env.causal:
        raise ShapeProblem("ssm(mamba) is causal only: its scan runs forward in time", None,
                           "use it in a causal model (head(lm)), or a mixer for a bidirectional one")
    if isinstance(p.dt_rank, int) and not 1 <= p.dt_rank <= 4096:
        raise ShapeProblem(f"dt_rank={p.dt_rank} is out of range", "dt_rank", "give 1..4096, or auto")
    return shape


class MambaMixer(nn.Module):
    def __init__(self, p: MambaParams, env: OpEnv):
        super().__init__()
        d, E, N, R = env.d, p.expand * env.d, p.N, rank(p, env.d)
        self.E, self.N, self.R, self.k, self.chunk = E, N, R, p.conv, p.chunk
        self.in_proj = nn.Linear(d, 2 * E, bias=p.bias)
        self.conv1d = nn.Conv1d(E, E, p.conv, groups=E, bias=p.conv_bias)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, d, bias=p.bias)
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -R ** -0.5, R ** -0.5)
            dt = torch.exp(torch.rand(E) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1

    def forward(self, u: torch.Tensor, ctx=None) -> torch.Tensor:
        cache = None if ctx is None else ctx.cache
        keep = None if ctx is None or ctx.mask is None or ctx.right_padded else ctx.mask
        x, z = self.in_proj(u).chunk(2, -1)
        x = x.transpose(1, 2)  # [b, E, n]
        if keep is not None:
            x = x * keep[:, None, :].to(x.dtype)
        key = None if cache is None else slot(ctx, self)
        state = None if cache is None else cache.caches.get(key)
        if state is None:
            xc = F.pad(x, (self.k - 1, 0))
        else:
            xc = torch.cat((state[0], x), 2)
        if cache is not None:
            conv_state = xc[:, :, xc.shape[2] - (self.k - 1):].clone()
        x = F.silu(self.conv1d(xc)).transpose(1, 2).contiguous()  # [b, n, E], token-major for the projection and scan
        del xc
        dt, B, C = self.x_proj(x).split((self.R, self.N, self.N), -1)
        dt = F.softplus(self.dt_proj(dt))
        if keep is not None:
            dt = dt * keep[:, :, None].to(dt.dtype)
        if not isinstance(x.shape[1], int) or torch.compiler.is_exporting():
            y, h = exported_scan(dt, -self.A_log.exp(), B, C, x)
        else:
            y, h = selective_scan(dt, -self.A_log.exp(), B, C, x, None if state is None else state[1], self.chunk)
        del dt, B, C
        if cache is not None:
            cache.caches[key] = (conv_state, h)
        y = y.addcmul_(x, self.D) * F.silu(z)
        return self.out_proj(y)


OP = register(Op(
    decode="the convolution's last k - 1 inputs [E, k - 1] and the state h [E, N]: constant in the length",
    family="ssm", variant="mamba", params=MambaParams, module=MambaMixer, causal="yes", shape=mamba_shape,
    paper="Mamba: Linear-Time Sequence Modeling with Selective State Spaces, Gu and Dao 2023, arXiv:2312.00752",
    summary="x, z = in_proj(u); x = silu(conv(x)); dt, B, C = x_proj(x); dt = softplus(dt_proj(dt)); "
            "h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t; y = (C_t h_t + D x_t) silu(z); out_proj; chunked scan O(n E N)",
    cost=mamba_cost, note="",
))
