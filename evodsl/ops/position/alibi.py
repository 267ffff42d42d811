"""pos(alibi): attention with linear biases (ALiBi, Press et al. 2021), applied inside every attention layer
downstream; on the stream it is the identity, and no position embedding is added.

Head h adds −m_h·(i − j) to the score of query i for key j ≤ i. The paper is causal; for bidirectional
attention this op uses −m_h·|i − j|, the common symmetric extension (the paper does not define one).
Slopes: for H heads, H a power of two, m_h = 2^(−8h/H), h = 1..H. Otherwise (the official code's rule) take
the slopes of 2^k heads, 2^k the largest power of two below H, then the slopes of 2^(k+1) heads at odd
positions h = 1, 3, 5, ... for the remaining H − 2^k heads.
"""
from __future__ import annotations

import math

import torch


from ..cost import Cost, Symbols
from ..registry import Op, OpParams, register, sequence_shape
from ._inattention import InAttentionPosition, InAttentionStream


class AlibiParams(OpParams):
    pass


def alibi_slopes(heads: int) -> list[float]:
    """m_1..m_H of the paper (and of its official code for H not a power of two)."""
    if heads & (heads - 1) == 0:
        return [2.0 ** (-8.0 * h / heads) for h in range(1, heads + 1)]
    low = 2 ** int(math.floor(math.log2(heads)))
    return alibi_slopes(low) + alibi_slopes(2 * low)[0::2][: heads - low]


class AlibiBias(InAttentionPosition):
    """bias(i, j) = −m_h·|i − j|, shape [h, *broadcast(i, j)]; the causal mask removes j > i."""

    def __init__(self, p: AlibiParams, heads: int, head_dim: int):
        super().__init__()
        self.register_buffer("slopes", torch.tensor(alibi_slopes(heads), dtype=torch.float32), persistent=False)

    def bias(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        distance = (i - j).abs()
        return -self.slopes.view(-1, *([1] * distance.dim())) * distance

    def extra_repr(self) -> str:
        return f"heads={self.slopes.numel()}"



def alibi_attach_cost(p: AlibiParams, s: Symbols, heads, kv_heads, head_dim, pairs=None, top=None) -> Cost:
    """The bias of `pairs` (query, key) pairs a sequence, built from int64 distances |i - j| (2 FLOPs per pair,
    then one product per head) and added to every score; nothing of it needs a gradient. Inside dense attention
    (SDPA) pairs = n^2 at once: the [h, n, n] bias and its distances alive besides q, k, v, ALiBi's O(n^2) memory.
    A kernel that builds it block by block (_scored.py) gives its pairs and its largest block's `top`: its peak is
    that block's bias and distances."""
    pairs = s.n ** 2 if pairs is None else pairs
    top = pairs if top is None else top
    return Cost(fwd_other=(2 + heads) * pairs + s.b * heads * pairs, bwd_other=0,
                peak=heads * top * s.bytes + 8 * top)


OP = register(Op(
    decode="the bias of the new queries against every key so far",
    shape=sequence_shape, family="pos", variant="alibi", params=AlibiParams, module=InAttentionStream, causal="yes", attach=AlibiBias,
    attach_cost=alibi_attach_cost,
    cost=lambda p, env, s: Cost(inplace=True),  # the identity on the stream: free
    paper="Train Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation, "
          "Press et al. 2021, arXiv:2108.12409",
    summary="score_h(i, j) += −m_h·(i − j) for j ≤ i (bidirectional: −m_h·|i − j|), m_h = 2^(−8h/H)",
    note="LLM/001.md",
))
