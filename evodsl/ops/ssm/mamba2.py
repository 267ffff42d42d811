"""ssm(mamba2, N=64, heads=H, groups=G): the Mamba-2 layer (Dao and Gu 2024, "Transformers are SSMs", arXiv:2405.21060,
Section 7 and Listing 1), the state space duality (SSD) with a scalar decay per head, as a sublayer:

    z, xBC, dt = in_proj(u)                       [E], [E + 2 G N], [H]       (E = expand d, P = E / H per head)
    x, B, C    = silu(conv1d(xBC))                causal depthwise, kernel k = conv; B, C [G, N], shared by H / G heads
    dt         = softplus(dt + dt_bias);  A = -exp(A_log)          per head (S4D-real init A_log[h] = log(h + 1))
    h_t        = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T              [P, N] per head
    y_t        = h_t C_t + D x_t
    out        = out_proj(RMSNorm_G(y * silu(z)))                  the gated norm, over groups of E / G channels

Training runs the SSD chunked algorithm (_mamba2_scan.py): in each chunk of T tokens the masked quadratic form
(C B^T . L) (dt x) with L the decays' 1-semiseparable mask, and the states carried between chunks by a Python loop:
O(n T (N + P) H + n N P H); the result does not depend on T. The ONNX export (a symbolic n, no loop to trace) runs
every chunk at once and carries the states by a mask over the chunks (ssd_export: O(n T + (n / T)^2) per head). Causal only; the step form keeps the convolution's
last k - 1 inputs [E + 2 G N, k - 1] and the state [H, P, N], whatever the length. Choices where the paper is silent,
as HF's Mamba2Mixer and state-spaces/mamba: no bias on in_proj and out_proj (bias= adds them), a bias on the
convolution, dt's bias softplus^-1 of a log-uniform draw in [0.001, 0.1] (floor 1e-4), D = 1, the norm's gain 1,
eps 1e-5, dt unclamped (HF's time_step_limit (0, inf)). Padding: as ssm(mamba), a padded position enters neither
the state (dt = 0) nor the convolution (its input zeroed), on either side.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...decode import slot
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register, sequence_shape
from ._mamba2_cost import mamba2_cost
from ._mamba2_scan import ssd_export, ssd_scan


class Mamba2Params(OpParams):
    N: int = Field(64, ge=1, le=1024, description="the state size per head and channel")
    expand: int = Field(2, ge=1, le=16, description="E = expand d: the inner width")
    heads: int | None = Field(None, ge=1, le=4096, description="H: heads of P = E / H channels; none: E / 64")
    groups: int = Field(1, ge=1, le=1024, description="G: groups of heads sharing B and C (and the norm's groups)")
    conv: int = Field(4, ge=1, le=64, description="k: the causal depthwise convolution's kernel")
    chunk: int = Field(64, ge=1, le=4096, description="T: tokens per chunk of the scan (the result is the same)")
    eps: float = Field(1e-5, gt=0.0, le=1.0, description="the gated RMSNorm's epsilon")
    bias: bool = Field(False, description="biases on in_proj and out_proj")
    conv_bias: bool = Field(True, description="a bias on the convolution")


def heads_of(p: Mamba2Params, d: int) -> int:
    return p.heads if p.heads is not None else max(1, p.expand * d // 64)


def mamba2_shape(p: Mamba2Params, env: OpEnv):
    shape = sequence_shape(p, env)
    if not env.causal:
        raise ShapeProblem("ssm(mamba2) is causal only: its scan runs forward in time", None,
                           "use it in a causal model (head(lm)), or a mixer for a bidirectional one")
    E, H = p.expand * env.d, heads_of(p, env.d)
    if E % H:
        raise ShapeProblem(f"the inner width E = {E} is not divisible by heads={H}", "heads",
                           "each head holds E / heads channels")
    if H % p.groups or E % p.groups:
        raise ShapeProblem(f"heads={H} are not divisible into groups={p.groups}", "groups",
                           "each group of B and C serves heads / groups heads")
    return shape


class Mamba2Mixer(nn.Module):
    def __init__(self, p: Mamba2Params, env: OpEnv):
        super().__init__()
        d, E, N, H, G = env.d, p.expand * env.d, p.N, heads_of(p, env.d), p.groups
        self.E, self.N, self.H, self.G, self.P, self.k, self.chunk, self.eps = E, N, H, G, E // H, p.conv, p.chunk, p.eps
        self.conv_dim = E + 2 * G * N
        self.in_proj = nn.Linear(d, E + self.conv_dim + H, bias=p.bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, p.conv, groups=self.conv_dim, bias=p.conv_bias)
        dt = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1
        self.A_log = nn.Parameter(torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(H))
        self.norm_weight = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, d, bias=p.bias)

    def forward(self, u: torch.Tensor, ctx=None) -> torch.Tensor:
        cache = None if ctx is None else ctx.cache
        keep = None if ctx is None or ctx.mask is None or ctx.right_padded else ctx.mask
        b, n = u.shape[:2]
        z, xbc, dt = self.in_proj(u).split((self.E, self.conv_dim, self.H), -1)
        xbc = xbc.transpose(1, 2)  # [b, E + 2 G N, n]
        if keep is not None:
            xbc = xbc * keep[:, None, :].to(xbc.dtype)
        key = None if cache is None else slot(ctx, self)
        state = None if cache is None else cache.caches.get(key)
        xc = F.pad(xbc, (self.k - 1, 0)) if state is None else torch.cat((state[0], xbc), 2)
        if cache is not None:
            conv_state = xc[:, :, xc.shape[2] - (self.k - 1):].clone()
        xbc = F.silu(self.conv1d(xc)).transpose(1, 2)
        del xc
        GN, r = self.G * self.N, self.H // self.G
        x = xbc[..., :self.E].reshape(b, n, self.H, self.P)
        B = xbc[..., self.E:self.E + GN].reshape(b, n, self.G, self.N).repeat_interleave(r, 2)
        C = xbc[..., self.E + GN:].reshape(b, n, self.G, self.N).repeat_interleave(r, 2)
        dt = F.softplus(dt + self.dt_bias)
        if keep is not None:
            dt = dt * keep[:, :, None].to(dt.dtype)
        A = -self.A_log.exp()
        if not isinstance(n, int) or torch.compiler.is_exporting():
            y, h = ssd_export(x, dt, A, B, C, self.chunk)  # the export: every chunk at once
        else:
            y, h = ssd_scan(x, dt, A, B, C, None if state is None else state[1], self.chunk)
        del dt, B, C
        if cache is not None:
            cache.caches[key] = (conv_state, h)
        y = (y + x * self.D[:, None]).reshape(b, n, self.G, self.E // self.G)
        g = y * F.silu(z.reshape(b, n, self.G, self.E // self.G))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.out_proj(g.reshape(b, n, self.E) * self.norm_weight)


OP = register(Op(
    decode="the convolution's last k - 1 inputs [E + 2 G N, k - 1] and the state [H, P, N]: constant in the length",
    family="ssm", variant="mamba2", params=Mamba2Params, module=Mamba2Mixer, causal="yes", shape=mamba2_shape,
    paper="Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space "
          "Duality, Dao and Gu 2024, arXiv:2405.21060",
    summary="z, xBC, dt = in_proj(u); x, B, C = silu(conv(xBC)); h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T per "
            "head; y = h_t C_t + D x_t; out_proj(RMSNorm(y silu(z))); SSD chunks: (C B^T . L) (dt x) + carried states",
    cost=mamba2_cost, note="",
))
