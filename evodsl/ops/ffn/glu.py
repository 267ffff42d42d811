"""ffn(glu | bilinear | reglu | geglu | geglu_tanh | swiglu): FFN_act(x) = (act(x W) ⊙ x V) W2 (Shazeer 2020).

One module, five variants, read from the VARIANTS table. W, V, W2 are `gate_proj`, `up_proj`, `down_proj`
as in LLaMA, so ffn(swiglu) has HF LlamaMLP's parameters. Three matrices instead of two: to keep the
parameter count of a 4 d FFN the paper takes d_ff = 8 d / 3; our default rounds that UP to a multiple of 64
(d = 512 -> 1408, d = 4096 -> 10944); a d_ff set by the user is taken as is (LLaMA-7B: 11008).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
import sympy as sp
from pydantic import Field
from torch import nn

from ..cost import Cost, linear
from ..registry import Op, OpEnv, OpParams, register
from .mlp import ACT_FLOPS

# variant -> (activation on the gate x W, summary, its name in ACT_FLOPS)
VARIANTS = {
    "glu": (torch.sigmoid, "(sigmoid(x W) ⊙ x V) W2", "sigmoid"),
    "bilinear": (lambda z: z, "(x W ⊙ x V) W2", "identity"),
    "reglu": (F.relu, "(relu(x W) ⊙ x V) W2", "relu"),
    "geglu": (F.gelu, "(gelu(x W) ⊙ x V) W2", "gelu"),  # exact GELU, x * Phi(x)
    # GELU's tanh approximation on the gate (Gemma's gelu_pytorch_tanh)
    "geglu_tanh": (partial(F.gelu, approximate="tanh"), "(gelu_tanh(x W) ⊙ x V) W2", "gelu_tanh"),
    "swiglu": (F.silu, "(swish(x W) ⊙ x V) W2", "silu"),  # Swish with beta = 1, i.e. SiLU
}


def default_d_ff(d: int) -> int:
    """8 d / 3 rounded up to a multiple of 64."""
    return -(-8 * d // (3 * 64)) * 64


class GLUParams(OpParams):
    d_ff: int | None = Field(None, ge=1, description="hidden width; default 8 d_model / 3 rounded up to a "
                                                      "multiple of 64")
    bias: bool = Field(False, description="biases on W, V, W2 (the paper's FFNs have none)")


class GatedFFN(nn.Module):
    def __init__(self, p: GLUParams, env: OpEnv, variant: str = "swiglu"):
        super().__init__()
        d_ff = p.d_ff or default_d_ff(env.d)
        self.variant = variant
        self.act = VARIANTS[variant][0]
        self.gate_proj = nn.Linear(env.d, d_ff, bias=p.bias)  # W
        self.up_proj = nn.Linear(env.d, d_ff, bias=p.bias)  # V
        self.down_proj = nn.Linear(d_ff, env.d, bias=p.bias)  # W2

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

    def extra_repr(self) -> str:
        return f"variant={self.variant}"


def cost(p: GLUParams, env: OpEnv, s, variant: str = "swiglu") -> Cost:
    """Three linears; the gate's activation (ACT_FLOPS) and the product, 1 FLOP each per hidden element,
    backward ~2x. Kept for backward, each [b, n, d_ff]: x V, act(x W), the product, and x W too when the
    activation needs its input (geglu, geglu_tanh, swiglu; sigmoid and relu keep their result, bilinear has none). At the
    inference peak act(x W), x V and the product are alive. Backward (net of what it has released): the two
    factors' gradients once the kept product is released, and at the end the input's two gradients and
    their sum, everything kept released."""
    f = s.sym("f", p.d_ff or default_d_ff(env.d))
    act = VARIANTS[variant][2]
    hidden = s.b * s.n * f * s.bytes
    out = s.b * s.n * s.d * s.bytes
    c = linear(s, s.d, f, p.bias) + linear(s, s.d, f, p.bias) + linear(s, f, s.d, p.bias)
    other = (ACT_FLOPS[act] + 1) * s.b * s.n * f
    saved = hidden * (4 if act in ("gelu", "gelu_tanh", "silu") else 3)
    return Cost(params=c.params, fwd=c.fwd, bwd=c.bwd, fwd_other=other, bwd_other=c.bwd_other + 2 * other,
                saves_input=True, saved=saved, peak=sp.Max(3 * hidden, hidden + out) - out,
                bwd_peak=sp.Max(2 * hidden, 3 * out - saved))


OPS = [register(Op(
    family="ffn", variant=name, params=GLUParams, module=partial(GatedFFN, variant=name), causal="n.a.",
    paper="GLU Variants Improve Transformer, Shazeer 2020, arXiv:2002.05202",
    summary=summary, note="FFN/003.md", cost=partial(cost, variant=name),
)) for name, (_, summary, _) in VARIANTS.items()]
