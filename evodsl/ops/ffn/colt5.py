"""ffn(colt5): CoLT5's conditional feed-forward (Ainslie et al. 2023, its conditional feedforward layer):

    y_i = FFd_light(x_i) + lambda_i FFd_heavy(x_i)    for the k routed tokens i,  y_i = FFd_light(x_i) elsewhere

FFd(x) = W2 act(W1 x + b1) + b2 as ffn(mlp), the light one of hidden width light (default d / 2), the heavy one
of width heavy (default 4 d: CoLT5's light and heavy MLPs, as lucidrains' defaults 0.5 and 4). lambda is the
router's soft top-k and the k routed tokens its hard top-k (_colt5_router.py: s = x u, the entropy-regularised
top-k solved by bisection on its threshold, then in closed form so that gradients reach u through lambda).
k is a fixed number of tokens, clipped at n: the heavy branch runs on min(k, n) rows, its cost is constant in n
(CoLT5 fixes the routed counts per input length; a fraction of n is not offered). The routed rows are gathered
by flat index ([b K] rows of [b n, d]), run through the heavy MLP, scaled by lambda and added back in place into
the light output (index_add_). Padding: padded tokens are never routed ahead of a token (their lambda is 0), so
each row's result at its tokens is that of the row alone.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..registry import Op, OpEnv, OpParams, ShapeProblem, register
from ._colt5_cost import colt5_ffn_cost
from ._colt5_router import Router
from .mlp import ACTIVATIONS


class CoLT5FFNParams(OpParams):
    light: int | None = Field(None, ge=1, description="hidden width of the light MLP (every token); default d / 2")
    heavy: int | None = Field(None, ge=1, description="hidden width of the heavy MLP (routed tokens); default 4 d")
    k: int = Field(64, ge=1, le=1 << 20, description="routed tokens per sequence (clipped at n)")
    eps: float = Field(0.1, gt=0.0, le=100.0, description="the soft top-k's entropy weight (temperature)")
    act: Literal["relu", "gelu", "gelu_tanh", "silu"] = Field("relu", description="activation of both MLPs")
    bias: bool = Field(True, description="biases b1, b2 of both MLPs")


def colt5_shape(p: CoLT5FFNParams, env: OpEnv):
    if len(env.shape) != 3 or not isinstance(env.d, int):
        raise ShapeProblem(f"ffn(colt5) routes tokens of a sequence: it needs a [b, n, d] stream, got "
                           f"[{', '.join(map(str, env.shape))}]", hint="put it before any pooling head")
    return env.shape


def widths(p: CoLT5FFNParams, d: int) -> tuple[int, int]:
    return p.light or max(1, d // 2), p.heavy or 4 * d


class CoLT5FFN(nn.Module):
    def __init__(self, p: CoLT5FFNParams, env: OpEnv):
        super().__init__()
        d = env.d
        light, heavy = widths(p, d)
        self.act_name = p.act
        self.router = Router(d, p.k, p.eps)
        self.light_up, self.light_down = nn.Linear(d, light, bias=p.bias), nn.Linear(light, d, bias=p.bias)
        self.heavy_up, self.heavy_down = nn.Linear(d, heavy, bias=p.bias), nn.Linear(heavy, d, bias=p.bias)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        b, n, d = x.shape
        idx, lam, _ = self.router(x, None if ctx is None else ctx.mask)
        if not isinstance(n, int):  # export: k rows gathered per sequence, the slots past n at weight 0
            at = idx[..., None].expand(-1, -1, d)
            return self.light(x).scatter_add(1, at, self.heavy(x.gather(1, at)) * lam[..., None])
        flat = (idx + torch.arange(b, device=x.device)[:, None] * n).flatten()  # [b K] rows of [b n, d]
        heavy = self.heavy(x.reshape(b * n, d).index_select(0, flat)) * lam.reshape(-1, 1)
        return self.light(x).view(b * n, d).index_add_(0, flat, heavy).view(b, n, d)

    def light(self, x):
        return self.light_down(ACTIVATIONS[self.act_name](self.light_up(x)))

    def heavy(self, x):
        return self.heavy_down(ACTIVATIONS[self.act_name](self.heavy_up(x)))


OP = register(Op(
    family="ffn", variant="colt5", params=CoLT5FFNParams, module=CoLT5FFN, causal="no", shape=colt5_shape,
    decode=None,  # routing reads the whole sequence: encoder-side, as CoLT5
    paper="CoLT5: Faster Long-Range Transformers with Conditional Computation, Ainslie et al. 2023, "
          "arXiv:2303.09752",
    summary="FFd_light(x) for every token + lambda_i FFd_heavy(x_i) on the k tokens a learned router picks "
            "(soft top-k lambda of s = x u, hard top-k); heavy cost O(k d f), not O(n d f)",
    note="MHA/LocalGlobal/006.md", cost=colt5_ffn_cost,
))
