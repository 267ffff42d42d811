"""ffn(ngpt): the normalized Transformer's MLP (Loshchilov, Hsieh, Sun & Ginsburg 2024, nGPT, arXiv:2410.01131,
section 2.4.2): a SwiGLU whose two input projections are rescaled per channel by learned vectors,

    u = s_u * (W_u h),   v = s_v * sqrt(d) * (W_v h),   out = W_o (u * SiLU(v))

(the sqrt(d) keeps SiLU out of its linear regime: W_v h, with unit-norm rows and h, is a cosine). s_u, s_v in
R^d_ff, stored at s_scale (default 1) and used as stored * (s_init / s_scale), starting at s_init = 1. Where the
paper and the authors' code differ (their code multiplies u by sqrt(d) too), the paper's equation is followed. No
biases (nGPT has none); W_u, W_v (rows) and W_o (columns) are kept unit-norm along d by evodsl.ngpt_normalize_.
Module names as ffn(glu): up_proj (W_u), gate_proj (W_v), down_proj (W_o)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..cost import Cost, linear
from ..registry import Op, OpEnv, OpParams, register


class NgptFFNParams(OpParams):
    d_ff: int | None = Field(None, ge=1, le=1 << 20, description="the hidden width; default 4 d_model")
    s_init: float = Field(1.0, gt=0, le=100, description="s_u's and s_v's starting value")
    s_scale: float = Field(1.0, gt=0, le=1, description="s_u's and s_v's stored init")


class NgptFFN(nn.Module):
    def __init__(self, p: NgptFFNParams, env: OpEnv):
        super().__init__()
        d, f = env.d, p.d_ff or 4 * env.d
        self.up_proj, self.gate_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.su, self.sv = nn.Parameter(torch.full((f,), p.s_scale)), nn.Parameter(torch.full((f,), p.s_scale))
        self.gain = p.s_init / p.s_scale
        self.v_gain = self.gain * math.sqrt(d)

    def forward(self, h: torch.Tensor, ctx=None) -> torch.Tensor:
        u = self.up_proj(h) * (self.su * self.gain)
        v = self.gate_proj(h) * (self.sv * self.v_gain)
        return self.down_proj(u * F.silu(v))


def cost(p: NgptFFNParams, env: OpEnv, s) -> Cost:
    """The three matmuls (2 d d_ff each per token, forward); 2 d_ff parameters for s_u, s_v. Elementwise (H = b n
    d_ff): the two scalings (2 H, and 2 d_ff for the scales' gains), SiLU (about 4 H), the product (H); backward
    about twice. Bytes (measured): kept, W_u h and W_v h (the scales' gradients), u and v, SiLU(v) and the product
    (W_o's input), and the two scales times their gains [d_ff]; the inference peak, four [b, n, d_ff] tensors at W_o
    (W_v h, u, v and the product) less one [b, n, d] (measured: 4 H - b n d); the backward's, two [b, n, d_ff]
    gradients at a time."""
    f = s.sym("d_ff", p.d_ff) if p.d_ff is not None else 4 * s.d
    c = linear(s, s.d, f, False) + linear(s, s.d, f, False) + linear(s, f, s.d, False)
    H, by = s.b * s.n * f, s.bytes
    return Cost(params=c.params + 2 * f, fwd=c.fwd, bwd=c.bwd, fwd_other=7 * H + 2 * f, bwd_other=14 * H,
                saves_input=True, saved=(6 * H + 2 * f) * by, peak=(4 * H - s.b * s.n * s.d) * by, bwd_peak=2 * H * by)


OP = register(Op(
    family="ffn", variant="ngpt", params=NgptFFNParams, module=NgptFFN, causal="n.a.",
    paper="nGPT: Normalized Transformer with Representation Learning on the Hypersphere, Loshchilov et al. 2024, "
          "arXiv:2410.01131",
    summary="W_o ((s_u W_u h) * SiLU(s_v sqrt(d) W_v h)), s_u, s_v in R^d_ff learned", cost=cost,
))
