"""ffn(mlp, act=relu|gelu|gelu_tanh|silu): y = W2 act(W1 x + b1) + b2, d_ff = 4 d_model by default."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..registry import Op, OpEnv, OpParams, register

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,  # x * Phi(x), Hendrycks & Gimpel 2016
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's approximation
    "silu": F.silu,  # x * sigmoid(x), Swish with beta = 1 (Ramachandran et al. 2017)
}


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


OP = register(Op(
    family="ffn", variant="mlp", params=MLPParams, module=MLP, causal="n.a.",
    paper="Attention Is All You Need, Vaswani et al. 2017, arXiv:1706.03762 (GELU: arXiv:1606.08415; "
          "Swish/SiLU: arXiv:1710.05941)",
    summary="W2 act(W1 x + b1) + b2",
    note="FFN/001.md",
))
