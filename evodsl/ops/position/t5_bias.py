"""pos(t5_bias, buckets=32, max_distance=128): T5's learned relative position bias (Raffel et al. 2019),
applied inside every softmax attention layer downstream; on the stream it is the identity.

Head h adds b_h(bucket(j - i)) to the score of query i for key j. One table b [buckets, heads] serves every
layer downstream (T5 computes it in the first layer and reuses it). The bucket of a distance r = j - i
(Mesh TensorFlow's rule): bidirectional, half of the buckets for r > 0 and half for r <= 0, on |r|; causal,
every bucket for r <= 0, on -r (r > 0 is masked anyway). Of the B buckets left, the first B/2 are exact
distances 0 .. B/2 - 1; the rest are logarithmic up to max_distance,
B/2 + floor(log(|r| / (B/2)) / log(max_distance / (B/2)) * (B - B/2)), capped at B - 1.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost, Symbols
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register, sequence_shape
from ._inattention import UpstreamTablePosition


class T5BiasParams(OpParams):
    heads: int = Field(8, ge=1, le=4096, description="heads of the attention layers it serves (binding heads)")
    buckets: int = Field(32, ge=4, le=4096, description="relative-distance buckets (bidirectional: half per side)")
    max_distance: int = Field(128, ge=2, description="distances from here on share the last bucket")


def t5_buckets(rel: torch.Tensor, causal: bool, buckets: int, max_distance: int) -> torch.Tensor:
    """The bucket of each relative position rel = j - i (int64; consumed: it is overwritten)."""
    side = None
    if causal:
        dist = rel.neg_().clamp_(min=0)
    else:
        buckets //= 2
        side = (rel > 0).long().mul_(buckets)  # the sign's half of the buckets
        dist = rel.abs_()
    exact = buckets // 2
    scale = (buckets - exact) / math.log(max_distance / exact)
    far = dist.float().clamp_(min=1).div_(exact).log_().mul_(scale).long().add_(exact).clamp_(max=buckets - 1)
    out = far.where(dist >= exact, dist)
    return out if side is None else out.add_(side)


class T5BiasTable(nn.Module):
    """The stream's side: the identity, which hands its table to the attention layers after it (ctx)."""

    def __init__(self, p: T5BiasParams, env: OpEnv):
        super().__init__()
        self.causal, self.buckets, self.max_distance = env.causal, p.buckets, p.max_distance
        self.weight = nn.Parameter(torch.empty(p.buckets, p.heads).normal_(0.0, 0.02))

    def bias(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """[h, *broadcast(i, j)]: b_h(bucket(j - i))."""
        idx = t5_buckets((j - i).contiguous(), self.causal, self.buckets, self.max_distance)
        return nn.functional.embedding(idx, self.weight).movedim(-1, 0)

    def dense(self, n: int, device) -> torch.Tensor:
        """bias(i, j) for i, j in 0..n-1, [h, n, n]: the n x n distances take 2n - 1 values, so the buckets and
        the table lookup are computed for those only, and the Toeplitz matrix is laid out by one copy (row i
        reads the values of distances -i .. n-1-i, a window of a [h, 2n - 1] row). For a symbolic n (export),
        whose windows the exported graph cannot lay out, the buckets of the n x n distances directly."""
        if not isinstance(n, int) or torch.jit.is_tracing() or torch.compiler.is_exporting():
            idx = torch.arange(n, device=device)
            return self.bias(idx[:, None], idx[None, :])
        rel = torch.arange(1 - n, n, device=device)  # j - i = -(n-1) .. n-1
        values = nn.functional.embedding(t5_buckets(rel, self.causal, self.buckets, self.max_distance),
                                         self.weight).t()  # [h, 2n - 1]
        return values.unfold(1, n, 1).flip(1)  # window k holds distances k-(n-1) ..; row i is window n-1-i

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        if ctx is not None:
            ctx.extra["t5_bias"] = self
        return x


class T5Bias(UpstreamTablePosition):
    """Inside attention: the bias of the table bound by the latest pos(t5_bias) upstream (bind(ctx))."""

    SCHEME = "t5_bias"
    learned = True  # the bias has a gradient (the cost of the attention reads this)

    def dense(self, n: int, device) -> torch.Tensor:
        return self._bound().dense(n, device)


def t5_bias_attach_cost(p: T5BiasParams, s: Symbols, heads, kv_heads, head_dim) -> Cost:
    """Inside dense attention: the buckets of the 2n - 1 distances (8 elementwise ops each) and their table
    rows, laid out as the [h, n, n] bias (one copy), added to every score; backward, the bias's gradient
    summed back onto the 2n - 1 rows. The table lookup keeps its 2n - 1 int64 buckets. The bias has a
    gradient, so in training SDPA runs its math kernel (the attention's cost counts that)."""
    n2, r = s.n ** 2, 2 * s.n - 1
    return Cost(fwd_other=8 * r + heads * n2 + s.b * heads * n2, bwd_other=heads * n2 + s.b * heads * n2,
                peak=heads * n2 * s.bytes + 16 * r, saved=8 * r)


def _shape(p: T5BiasParams, env: OpEnv):
    sequence_shape(p, env)
    exact = (p.buckets if env.causal else p.buckets // 2) // 2  # distances below it get a bucket each
    if p.max_distance <= exact:
        raise ShapeProblem(f"pos(t5_bias) max_distance={p.max_distance} does not reach past its {exact} exact "
                           f"distances", "max_distance", f"log-spaced buckets cover {exact} .. max_distance: "
                           f"set max_distance > {exact}, or fewer buckets")
    return env.shape


def t5_bias_cost(p: T5BiasParams, env: OpEnv, s: Symbols) -> Cost:
    """The identity on the stream; the table's parameters are counted here, once."""
    return Cost(params=p.buckets * p.heads, inplace=True)


OP = register(Op(
    decode="the bias of the new queries against every key so far",
    family="pos", variant="t5_bias", params=T5BiasParams, module=T5BiasTable, causal="yes", attach=T5Bias, shape=_shape,
    attach_cost=t5_bias_attach_cost, cost=t5_bias_cost,
    paper="Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer, Raffel et al. "
          "2019, arXiv:1910.10683",
    summary="score_h(i, j) += b_h(bucket(j - i)), log-spaced buckets, one table for every layer downstream",
))
