"""pos(kerple, kind=power|log): KERPLE's kernelized relative position bias (Chi et al. 2022, arXiv:2205.09921,
§4), applied inside every softmax attention downstream; on the stream it is the identity.

Head h adds a conditionally positive definite kernel of the distance |m − n| to the score of query m for key n:
- kind=power: −r1_h |m − n|^r2_h,            r1 > 0, 0 < r2 <= 2;
- kind=log:   −r1_h log(1 + r2_h |m − n|),   r1, r2 > 0.
Choices where the paper is silent, from the authors' code (ParallelKerplePower / ParallelKerpleLog in gpt-neox):
- r1, r2 are learned per head and per layer (each attention layer has its own), stored as they are and used
  clamped: max(r, 0.01), and power's r2 also min(r2, 2). The authors clamp the stored values after each step;
  clamping in the forward gives the same values (their gradient is zero while clamped).
- Initialised as the authors': power r1 ~ U(0, 1), r2 ~ U(0, 2); log r1 ~ U(0, 2), r2 ~ U(0, 1) (torch's RNG).
- The paper is causal; bidirectional attention gets the same kernel of |m − n| (symmetric, as pos(alibi)).
Only mha(softmax) lists it: its dense path gives a learned bias a gradient (SDPA's math kernel in training, as
pos(t5_bias)); the banded kernels pass their bias to SDPA as a mask, which gets no gradient there.
The dense bias: the kernel at the n distances 0..n−1 per head, [h, n], laid out as [h, n, n] by one gather on
|m − n|. Decoding: the bias of the new queries (at their positions) against every key so far.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost, Symbols
from ..registry import Op, OpParams, register, sequence_shape
from ._inattention import InAttentionPosition, InAttentionStream

EPS = 0.01  # the authors' clamp


class KerpleParams(OpParams):
    kind: Literal["power", "log"] = Field("log", description="−r1 |m−n|^r2 (power) or −r1 log(1 + r2 |m−n|) (log)")


class KerpleBias(InAttentionPosition):
    """bias(i, j) = the kernel of |i − j| per head, [h, *broadcast(i, j)]; r1, r2 [h] learned."""

    learned = True  # the bias has a gradient (the attention's cost reads this)

    def __init__(self, p: KerpleParams, heads: int, head_dim: int):
        super().__init__()
        self.kind = p.kind
        scale1, scale2 = (1.0, 2.0) if p.kind == "power" else (2.0, 1.0)
        self.r1 = nn.Parameter(torch.rand(heads) * scale1)
        self.r2 = nn.Parameter(torch.rand(heads) * scale2)

    def kernel(self, distance: torch.Tensor) -> torch.Tensor:
        """−r1 |d|^r2 or −r1 log(1 + r2 |d|) for d >= 0 (float), [h, *d.shape]."""
        shape = (-1, *([1] * distance.dim()))
        r1 = self.r1.clamp(min=EPS).view(shape)
        if self.kind == "power":
            return -r1 * distance.pow(self.r2.clamp(min=EPS, max=2.0).view(shape))
        return -r1 * torch.log1p(self.r2.clamp(min=EPS).view(shape) * distance)

    def bias(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return self.kernel((i - j).abs().to(self.r1.dtype))

    def dense(self, n: int, device) -> torch.Tensor:
        idx = torch.arange(n, device=device)
        values = self.kernel(idx.to(self.r1.dtype))  # [h, n]: the kernel at distances 0..n-1
        return values[:, (idx[:, None] - idx[None, :]).abs()]

    def extra_repr(self) -> str:
        return f"kind={self.kind}, heads={self.r1.numel()}"


def kerple_attach_cost(p: KerpleParams, s: Symbols, heads, kv_heads, head_dim) -> Cost:
    """Inside dense attention: 2 parameters per head; the kernel at n distances (4 FLOPs each per head, with the
    clamps), the int64 distances |m − n| (2 per pair), the [h, n, n] gather, added to every score; backward, the
    bias's gradient summed back onto the [h, n] values (one add per entry) and through the kernel. At the
    bias's construction it and the distances are alive besides q, k, v (O(n^2), as ALiBi's); backward keeps the
    distances (the gather's index) and the kernel's inputs, O(n)."""
    n2 = s.n ** 2
    return Cost(params=2 * heads, fwd_other=4 * heads * s.n + 2 * n2 + s.b * heads * n2,
                bwd_other=heads * n2 + s.b * heads * n2 + 8 * heads * s.n,
                peak=heads * n2 * s.bytes + 8 * n2, saved=8 * n2 + 4 * heads * s.n * s.bytes)


OP = register(Op(
    decode="the bias of the new queries against every key so far",
    shape=sequence_shape, family="pos", variant="kerple", params=KerpleParams, module=InAttentionStream,
    causal="yes", attach=KerpleBias, attach_cost=kerple_attach_cost,
    cost=lambda p, env, s: Cost(inplace=True),  # the identity on the stream; the parameters are the attention's
    paper="KERPLE: Kernelized Relative Positional Embedding for Length Extrapolation, Chi et al. 2022, "
          "arXiv:2205.09921",
    summary="score_h(m, n) += −r1_h |m−n|^r2_h (power) or −r1_h log(1 + r2_h |m−n|) (log), r1, r2 learned per "
            "head and layer",
    note="Pe/006.md",
))
