"""memory(xl, mem_len=M): Transformer-XL's segment-level recurrence (Dai et al. 2019). Every attention op after
it in its stream keeps the last M of its inputs (the hidden states entering it) from the segments before, with
no gradient (the paper's SG(·)), and the next segment's keys and values are computed over them and the new
positions: h~ = [SG(m) ∘ h], q = h W_q, k = h~ W_k, v = h~ W_v. A causal query i of the segment reads the memory
and the positions up to its own. On the stream it is the identity; the state lives in model.recur's
SegmentState (an ordinary forward is a first segment: no memory). Pair it with pos(xl_rel), XL's relative
positions, which reach into the memory."""
from __future__ import annotations

from pydantic import Field

from ..cost import Cost
from ..position._inattention import InAttentionStream
from ..registry import Op, OpParams, register, sequence_shape


class XLMemoryParams(OpParams):
    mem_len: int = Field(ge=1, le=1 << 20, description="positions of earlier segments each attention keeps (M)")


OP = register(Op(
    family="memory", variant="xl", params=XLMemoryParams, module=InAttentionStream, causal="yes",
    shape=sequence_shape, sets="memory",
    cost=lambda p, env, s: Cost(inplace=True),  # the identity on the stream: the attention ops count the keys
    decode=None,  # a segment recurrence: model.recur carries it, one segment at a time
    paper="Transformer-XL: Attentive Language Models Beyond a Fixed-Length Context, Dai et al. 2019, "
          "arXiv:1901.02860",
    summary="each attention reads [SG(m_{τ-1}) ∘ h_τ] as keys and values: the last M inputs of earlier "
            "segments, no gradient",
    note="Pe/009.md",
))
