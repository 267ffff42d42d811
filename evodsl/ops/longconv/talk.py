"""longconv(talk, l_max, r_max): Time-aware Large Kernel convolution (TaLK; Lioutas and Guo 2020, arXiv:2002.03184):
each token sums the inputs in a window whose bounds it predicts, read from a prefix-sum table in O(1):

    a~^l_i, a~^r_i = sigmoid(f^l(x_i)), sigmoid(f^r(x_i))         one pair per head (H heads of d / H channels)
    a^l_i = i - a~^l_i l_max,   a^r_i = i + a~^r_i r_max           (clipped to the sequence)
    S_{-1} = 0, S_j = sum_{k <= j} x_k                             the prefix sums (per channel)
    o_i = S_{a^r_i} - S_{a^l_i - 1},  S at a fractional index by linear interpolation between its neighbours
    y_i = W_o (o_i / (l_max + r_max + 1)) + b_o

Interpolated, o_i weights x_j by the overlap of [j, j + 1) with [a^l_i, a^r_i + 1): the tokens inside count fully,
the two boundary tokens by their fractions (so the bounds learn through the fractions). O(b n d): a cumulative sum,
four gathers a token, no [n, n] tensor. Causal form (the paper's decoder): r = 0 (a^r_i = i); a causal model
refuses r_max > 0. Choices where the paper is silent: f^l, f^r are one linear map d -> 2 H with a bias, W_o a
linear map d -> d (the paper's layer puts a GLU projection before, the block's FFN after: here they are the model's
other ops); r_max defaults to l_max when bidirectional; the paper's dropout on the offsets is left out.
Padding: a padded input is zeroed before the sums, so it adds nothing to any window on either side (the window's
normaliser is the constant 1 / (l_max + r_max + 1): a sequence alone and padded give the same outputs).
Decoding (causal): a window reaches at most l_max tokens back, so the step keeps the last l_max inputs
[b, l_max, d] (zeros before the first token, which add nothing): a flat state, whatever the length.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ...decode import slot
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register, sequence_shape
from ._talk_cost import talk_cost


class TaLKParams(OpParams):
    l_max: int = Field(ge=1, le=1 << 20, description="the farthest a window reaches back")
    r_max: int | None = Field(None, ge=0, le=1 << 20, description="the farthest it reaches ahead (bidirectional; "
                                                                   "default l_max, causal 0)")
    heads: int = Field(1, ge=1, le=4096, description="H: groups of d / H channels that share their bounds")
    bias: bool = Field(True, description="a bias on the output map")


def reach(p: TaLKParams, causal: bool) -> int:
    return 0 if causal else (p.l_max if p.r_max is None else p.r_max)


def talk_shape(p: TaLKParams, env: OpEnv):
    shape = sequence_shape(p, env)
    if env.causal and p.r_max:
        raise ShapeProblem(f"longconv(talk) in a causal model reads no later token: r_max={p.r_max} must be 0",
                           "r_max", "leave r_max out (a causal model's windows end at the token)")
    if env.d % p.heads:
        raise ShapeProblem(f"heads={p.heads} does not divide d={env.d}", "heads", "give a divisor of d")
    return shape


def interpolate(table: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """table [b, m, H, c] read at fractional rows at [b, q, H] in [0, m - 1] -> [b, q, H, c], linearly."""
    lo = at.floor()
    frac = (at - lo)[..., None]
    i = lo.long()
    top = table.shape[1] - 1
    shape = (*at.shape, table.shape[-1])
    low = table.gather(1, i[..., None].expand(shape))
    high = table.gather(1, (i + 1).clamp(max=top)[..., None].expand(shape))
    return low + frac * (high - low)


class TaLKConv(nn.Module):
    def __init__(self, p: TaLKParams, env: OpEnv):
        super().__init__()
        self.causal, self.heads, self.l_max, self.r_max = env.causal, p.heads, p.l_max, reach(p, env.causal)
        self.bounds = nn.Linear(env.d, 2 * p.heads)  # f^l, f^r
        self.out = nn.Linear(env.d, env.d, bias=p.bias)

    def windows(self, x: torch.Tensor, xs: torch.Tensor, first) -> torch.Tensor:
        """The window sums of the tokens x [b, q, d], which sit at rows first.. of the inputs xs [b, m, d]."""
        b, q, d = x.shape
        m = xs.shape[1]
        al, ar = torch.sigmoid(self.bounds(x)).chunk(2, -1)  # [b, q, H]
        i = torch.arange(q, device=x.device, dtype=x.dtype)[:, None] + first
        table = torch.cat((xs.new_zeros(b, 1, d), xs.cumsum(1)), 1).view(b, m + 1, self.heads, d // self.heads)
        left = (i - al * self.l_max).clamp(min=0)  # S_{a^l - 1}: table row a^l
        if self.r_max:  # S_{a^r}: row a^r + 1
            o = interpolate(table, (i + 1 + ar * self.r_max).clamp(max=m)) - interpolate(table, left)
        else:  # causal: a^r = i, a whole row
            o = table[:, first + 1:] - interpolate(table, left)
        return o.reshape(b, q, d) / (self.l_max + self.r_max + 1)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        mask = None if ctx is None else ctx.mask
        xs = x
        if mask is not None and not (self.causal and ctx.right_padded):
            xs = x * mask[..., None].to(x.dtype)
        if ctx is None or ctx.cache is None:
            return self.out(self.windows(x, xs, 0))
        key = slot(ctx, self)
        old = ctx.cache.caches.get(key)
        if old is None:
            old = x.new_zeros(x.shape[0], self.l_max, x.shape[2])
        xs = torch.cat((old, xs), 1)
        ctx.cache.caches[key] = xs[:, xs.shape[1] - self.l_max:].clone()
        return self.out(self.windows(x, xs, self.l_max))


OP = register(Op(
    decode="the last l_max inputs [l_max, d] (a window reaches no farther back): constant in the length",
    family="longconv", variant="talk", params=TaLKParams, module=TaLKConv, causal="yes", shape=talk_shape,
    paper="Time-aware Large Kernel Convolutions, Lioutas and Guo 2020, arXiv:2002.03184",
    summary="a^l = i - sigmoid(f^l x_i) l_max, a^r = i + sigmoid(f^r x_i) r_max per head; o_i = S(a^r) - S(a^l - 1) "
            "from prefix sums, interpolated; y = W_o o / (l_max + r_max + 1); causal r = 0; O(n d)",
    cost=talk_cost, note="LongConv/010.md",
))
