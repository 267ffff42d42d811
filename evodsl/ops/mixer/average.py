"""mixer(average): the Average Attention Network (AAN; Zhang, Xiong, Su 2018, Accelerating Neural Transformer via an
Average Attention Network, arXiv:1805.00631), the decoder's self-attention replaced by a cumulative average.

For the layer's input y_1 .. y_n (d wide), section 3:

    g_j = FFN((1/j) sum_{k<=j} y_k),    FFN(a) = W_2 relu(W_1 a + b_1) + b_2      (the average layer)
    i_j, f_j = sigmoid(W [y_j; g_j] + b)    (i_j, f_j in R^d)                       (the gating layer)
    h~_j = i_j * y_j + f_j * g_j,            h_j = LayerNorm(y_j + h~_j)

The op is h~ (average, FFN, gates): the residual and the LayerNorm are the block's, written in the spec as the
paper's post-norm block `residual(mixer(average)) -> norm(layernorm)` (or pre-norm, `norm -> mixer(average)` with
the residual sugar), as for every sublayer. Choices where the paper is silent: d_ff defaults to 4 d (the FFN of the
model it replaces attention in); ffn=false is the paper's ablation without the FFN (g_j the average itself); W is
one [2d -> 2d] map, kept as two (W_y on y, with the bias, and W_g on g: W [y; g] = W_y y + W_g g, no concatenation).
It is a token mixer without attention (no queries, keys, heads), hence the mixer family.

Causal (the paper's decoder): the average of the prefix, a cumulative sum over the sequence divided by the count:
O(n d) beside the FFN's and gates' O(n d d_ff), no n x n tensor (the paper's parallel form is a masked [n, n]
matrix; the cumulative sum is its O(n d) equivalent, the recurrent form run at once). Decoding keeps the running sum
(d numbers a row) and the count. Bidirectional (an encoder, our construction): every position's average is the
mean of the whole sequence, so g is one vector a row (the FFN runs on b rows).
Padding: padded positions are left out of the sums and counts (the average of each row's tokens, counted from its
first token), so left and right padding give each sequence alone.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ...decode import slot
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register
from ._average_cost import average_cost


class AverageParams(OpParams):
    d_ff: int | None = Field(None, ge=1, le=1 << 20, description="the FFN's inner width; default 4 d_model")
    ffn: bool = Field(True, description="the FFN on the average (false: the paper's ablation, g = the average)")
    bias: bool = Field(True, description="biases on the FFN and the gates")


def average_shape(p: AverageParams, env: OpEnv):
    if len(env.shape) != 3 or not isinstance(env.d, int):
        raise ShapeProblem(f"mixer(average) needs a [b, n, d] stream, got [{', '.join(map(str, env.shape))}]",
                           hint="put embed(...) first")
    return env.shape


class AverageAttentionNetwork(nn.Module):
    def __init__(self, p: AverageParams, env: OpEnv):
        super().__init__()
        d = env.d
        self.causal = env.causal
        self.ffn = nn.Sequential(nn.Linear(d, p.d_ff or 4 * d, bias=p.bias), nn.ReLU(),
                                 nn.Linear(p.d_ff or 4 * d, d, bias=p.bias)) if p.ffn else None
        self.gate_y = nn.Linear(d, 2 * d, bias=p.bias)  # W_y, b: the input and forget gates' logits from y
        self.gate_g = nn.Linear(d, 2 * d, bias=False)  # W_g: from g

    def mix(self, y: torch.Tensor, avg: torch.Tensor) -> torch.Tensor:
        """h~ from y [b, n, d] and the averages [b, n | 1, d]."""
        g = self.ffn(avg) if self.ffn is not None else avg
        i, f = torch.sigmoid(self.gate_y(y) + self.gate_g(g)).chunk(2, dim=-1)
        return i * y + f * g

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        mask = ctx.mask if ctx is not None else None
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        y = x if mask is None else x * mask[..., None].to(x.dtype)  # padding out of the sums
        if not self.causal:
            count = x.shape[1] if mask is None else mask.sum(1).clamp(min=1)[:, None, None].to(x.dtype)
            return self.mix(x, y.sum(1, keepdim=True) / count)
        if mask is None:
            count = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[:, None]
        else:  # tokens so far (a padded position before every token divides by 1: finite, read by no token)
            count = mask.cumsum(1).clamp(min=1)[..., None].to(x.dtype)
        return self.mix(x, y.cumsum(1) / count)

    def _step(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """Decoding: the running sum [b, 1, d] and the count of the tokens so far continue the averages."""
        old = ctx.cache.caches.get(slot(ctx, self))
        sums = x.cumsum(1)
        seen = 0
        if old is not None:
            sums, seen = sums + old[0], old[1]
        count = torch.arange(seen + 1, seen + x.shape[1] + 1, device=x.device, dtype=x.dtype)[:, None]
        ctx.cache.caches[slot(ctx, self)] = (sums[:, -1:].clone(), seen + x.shape[1])
        return self.mix(x, sums / count)


OP = register(Op(
    decode="the running sum of the inputs (d numbers a row) and their count",
    family="mixer", variant="average", params=AverageParams, module=AverageAttentionNetwork,
    causal="yes", shape=average_shape,
    paper="Accelerating Neural Transformer via an Average Attention Network, Zhang et al. 2018, arXiv:1805.00631",
    summary="g_j = FFN(mean_{k<=j} y_k); i, f = sigmoid(W [y_j; g_j]); h~_j = i * y_j + f * g_j (the residual and "
            "LayerNorm from the block); causal: cumulative average, O(n d d_ff); bidirectional: the row's mean",
    note="Others/001.md", cost=average_cost,
))
