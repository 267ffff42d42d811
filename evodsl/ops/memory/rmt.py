"""memory(rmt, length=m): the Recurrent Memory Transformer's memory tokens (Bulatov, Kuratov & Burtsev 2022).
It begins a stream of its own, `mem = memory(rmt, length=m)`: m vectors of width d_model, learned at the first
segment and, at every later one, the value that the stream declared `NAME(writes=mem) = ...` had at the end of
the segment before. The paper's decoder reads the memory before the segment's tokens and writes it after them,
H = Transformer([M_read; X_τ; M_write]) with M_read = M_write = M_τ, and M_{τ+1} = H[-m:] (the write positions'
outputs); in a spec that is `cat(prefix=mem, suffix=mem)` and `next(writes=mem) = h -> slice(last=m)`. The
memory keeps its gradient: model.run_segments(ids, seg, grad_segments=k) backpropagates through k segments."""
from __future__ import annotations

from dataclasses import replace

import torch
from pydantic import Field
from torch import nn

from ...diagnostics import Diagnostic, EvoError
from ..cost import Cost
from ..latent.array import cost as array_cost
from ..registry import Op, OpEnv, OpParams, register


class RMTMemoryParams(OpParams):
    length: int = Field(ge=1, le=1 << 20, description="number of memory tokens (m)")
    d_model: int = Field(ge=1, le=1 << 20, description="their width (default: the binding d_model)")


class RMTMemory(nn.Module):
    """The memory stream's first value: the learned tokens, one copy per sequence (a first segment), or the
    tokens model.recur's SegmentState carries under the stream's name."""

    def __init__(self, p: RMTMemoryParams, env: OpEnv):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(p.length, p.d_model).normal_(0.0, 0.02))
        self.stream = env.stream

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        state = ctx.extra.get("segments") if ctx is not None else None
        if ctx is not None:
            ctx.mask, ctx.right_padded = None, False  # every memory token is real
        carried = state.memory.get(self.stream) if state is not None else None
        if carried is None:
            return self.weight.unsqueeze(0).repeat(x.shape[0], 1, 1)
        if carried.shape[0] != x.shape[0]:
            raise EvoError([Diagnostic("E414", f"the memory '{self.stream}' carries {carried.shape[0]} sequences, "
                                               f"this segment has {x.shape[0]}",
                                       help="continue a state with segments of the batch it was started with")])
        return carried


def cost(p: RMTMemoryParams, env: OpEnv, s) -> Cost:
    """A first segment's (an ordinary forward's): a latent array's copy per sequence. The state carried to the
    next segment is the written value, [b, m, d]: its bytes are the decoding-state figure."""
    c = array_cost(p, env, s)
    return replace(c, cache=s.b * s.sym("L", p.length) * s.sym("d", p.d_model) * s.bytes)


OP = register(Op(
    family="memory", variant="rmt", params=RMTMemoryParams, module=RMTMemory, causal="n.a.",
    shape=lambda p, env: (env.shape[0], p.length, p.d_model), cost=cost, starts=True, carried=True,
    decode=None,  # a segment recurrence: model.recur carries it, one segment at a time
    paper="Recurrent Memory Transformer, Bulatov, Kuratov & Burtsev 2022, arXiv:2207.06881",
    summary="M_1 learned [m, d]; segment τ runs [M_τ; X_τ; M_τ], M_{τ+1} = its last m outputs (with gradient)",
    note="Memory/009.md",
))
