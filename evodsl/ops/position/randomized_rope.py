"""pos(randomized_rope, max_len=L, base=10000, pairs=interleaved): randomized positional encodings (Ruoss et al.
2023, arXiv:2305.16843) around RoPE: pos(rope)'s rotation at positions drawn as pos(randomized) draws them (in
training a sorted random sample of n distinct positions of 0..L−1, fresh per forward, one for the batch and every
layer; otherwise 0..n−1, decoding offset..). So q_m·k_n depends on p_m − p_n: in training the distances the
model sees reach up to L − 1.
The sample is drawn by this op's stream module and handed to the attention layers through the forward's context
(as pos(t5_bias) hands its table), so only the attentions that bind the context take it: mha(softmax) (its
plain and modified paths). Outside training it is exactly pos(rope, base, pairs).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost
from ..registry import Op, OpEnv, OpParams, register, sequence_shape
from .randomized import CTX_KEY, positions
from .rope import Rotary, RotaryParams, rotary_attach_cost
from ._rope_scaling import frequencies


class RandomizedRopeParams(OpParams):
    max_len: int = Field(ge=2, le=1 << 24, description="L: positions are drawn from 0..L-1 in training")
    base: float = Field(10000.0, gt=1.0, description="θ_i = base^(-2i/r), as pos(rope)")
    pairs: Literal["interleaved", "halves"] = Field("interleaved", description="which channels turn together")


class RandomizedRopeStream(nn.Module):
    """The identity on the stream; in training it draws the batch's positions and leaves them in the context."""

    def __init__(self, p: RandomizedRopeParams, env: OpEnv):
        super().__init__()
        self.max_len = p.max_len

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        if ctx is not None:
            ctx.extra.pop(CTX_KEY, None)
            if self.training:
                positions(self, x.shape[1], self.max_len, x.device, ctx)
        return x


class RandomizedRotary(Rotary):
    """pos(rope)'s turn at the positions bound from the context (training), else at offset.. as pos(rope)."""

    def __init__(self, p: RandomizedRopeParams, heads: int, head_dim: int):
        super().__init__(RotaryParams(base=p.base, pairs=p.pairs), heads, head_dim)
        self.__dict__["_positions"] = None

    def bind(self, ctx) -> None:
        self.__dict__["_positions"] = None if ctx is None else ctx.extra.get(CTX_KEY)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0):
        pos = self._positions
        if pos is None or pos.shape[0] != q.shape[-2]:
            return super().rotate(q, k, offset)
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        angle = pos.to(work)[:, None] * frequencies(self.p, self.rot, work, q.device)[None, :]
        cos, sin = angle.cos().to(q.dtype), angle.sin().to(q.dtype)
        return self._turn(q, cos, sin), self._turn(k, cos, sin)


def attach_cost(p: RandomizedRopeParams, s, heads, kv_heads, head_dim) -> Cost:
    """pos(rope)'s (eval: positions 0..n-1; the training sample, O(L), is not counted)."""
    return rotary_attach_cost(RotaryParams(base=p.base, pairs=p.pairs), s, heads, kv_heads, head_dim)


OP = register(Op(
    decode="q, k turned at the positions after those seen (offset), as outside training",
    shape=sequence_shape, family="pos", variant="randomized_rope", params=RandomizedRopeParams,
    module=RandomizedRopeStream, causal="yes", attach=RandomizedRotary, attach_cost=attach_cost,
    cost=lambda p, env, s: Cost(inplace=True),  # the identity on the stream
    paper="Randomized Positional Encodings Boost Length Generalization of Transformers, Ruoss et al. 2023, "
          "arXiv:2305.16843",
    summary="rope at positions p_t: training, a sorted random sample of n distinct positions of 0..L-1 per "
            "batch; eval p_t = t",
    note="Pe/013.md",
))
