"""ffn(mlp, act=relu|gelu|gelu_tanh|silu): y = W2 act(W1 x + b1) + b2, d_ff = 4 d_model by default."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
import sympy as sp
from pydantic import Field
from torch import nn

from ..cost import Cost, linear
from ..registry import Op, OpEnv, OpParams, register

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,  # x * Phi(x), Hendrycks & Gimpel 2016
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's approximation
    "silu": F.silu,  # x * sigmoid(x), Swish with beta = 1 (Ramachandran et al. 2017)
}

# Forward FLOPs per element, counting each arithmetic op and each exp/erf/tanh as 1 (ffn(glu) uses this too):
# relu max(z, 0); gelu z/√2, erf, +1, ·z, ·0.5; gelu_tanh z³ (2), ·c, +z, ·√(2/π), tanh, +1, ·z, ·0.5;
# sigmoid −z, exp, +1, 1/·; silu sigmoid then ·z.
ACT_FLOPS = {"relu": 1, "gelu": 5, "gelu_tanh": 9, "sigmoid": 4, "silu": 5, "identity": 0}


class MLPParams(OpParams):
    act: Literal["relu", "gelu", "gelu_tanh", "silu"] = Field("relu", description="activation")
    d_ff: int | None = Field(None, ge=1, description="hidden width; default 4 * d_model")
    bias: bool = Field(True, description="biases b1, b2")


class MLP(nn.Module):
    def __init__(self, p: MLPParams, env: OpEnv):
        super().__init__()
        d_ff = p.d_ff or 4 * env.d
        self.act_name = p.act
        self.up_proj = nn.Linear(env.d, d_ff, bias=p.bias)
        self.down_proj = nn.Linear(d_ff, env.d, bias=p.bias)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        return self.down_proj(ACTIVATIONS[self.act_name](self.up_proj(x)))


def cost(p: MLPParams, env: OpEnv, s) -> Cost:
    """Two linears; the activation costs ACT_FLOPS per hidden element, its backward ~2x. Kept for backward: the
    hidden pre-activation (not for relu, which keeps only its result) and post-activation [b, n, d_ff]. At the
    inference peak both hidden tensors are alive (or the post-activation beside the output, if d_ff < d).
    Backward (net of what it has released): relu, the gradients of the post- and the pre-activation, then the
    input's once the kept result is released; otherwise the post-activation's gradient as the kept
    post-activation is released, then the input's once both kept tensors are."""
    f = s.sym("f", p.d_ff or 4 * env.d)
    hidden = s.b * s.n * f * s.bytes
    out = s.b * s.n * s.d * s.bytes
    c = linear(s, s.d, f, p.bias) + linear(s, f, s.d, p.bias)
    act = ACT_FLOPS[p.act] * s.b * s.n * f
    return Cost(params=c.params, fwd=c.fwd, bwd=c.bwd, fwd_other=act, bwd_other=c.bwd_other + 2 * act,
                saves_input=True, saved=hidden * (1 if p.act == "relu" else 2),
                peak=sp.Max(2 * hidden, hidden + out) - out, bwd_peak=(sp.Max(2 * hidden, out) if p.act == "relu" else sp.Max(hidden, out - hidden)))


OP = register(Op(
    family="ffn", variant="mlp", params=MLPParams, module=MLP, causal="n.a.",
    paper="Attention Is All You Need, Vaswani et al. 2017, arXiv:1706.03762 (GELU: arXiv:1606.08415; "
          "Swish/SiLU: arXiv:1710.05941)",
    summary="W2 act(W1 x + b1) + b2", cost=cost,
    note="FFN/001.md",
))
