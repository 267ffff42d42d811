"""Segment recurrence: a model that carries state from one segment of a long sequence to the next.

`memory(xl, mem_len=M)` (Transformer-XL) keeps, per attention op, the last M inputs it has seen (stop-gradient):
the next segment's keys and values are computed over them and the new positions. `memory(rmt, length=m)`
(Recurrent Memory Transformer) starts a stream of m memory tokens: a learned array at the first segment, then the
value of the stream that `writes` it at the end of the previous segment (with its gradient, within the segments
that backpropagate). `SegmentState` holds both; `model.recur(ids, state)` runs one segment, and
`model.run_segments(ids, segment_len)` a whole sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SegmentState:
    """What a model carries between segments: `memory` maps each XL attention's slot to its last M inputs
    [b, M', d] (M' <= M) and each RMT memory stream's name to its tokens [b, m, d]; `segments` counts the
    segments run, `seen` their tokens."""

    memory: dict = field(default_factory=dict)
    segments: int = 0
    seen: int = 0

    def nbytes(self) -> int:
        """Bytes held by the carried tensors (each storage once)."""
        seen, total = set(), 0
        for t in self.memory.values():
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total

    def detach(self) -> "SegmentState":
        """The same state with no gradient history (truncated backpropagation through the segments)."""
        return SegmentState({k: v.detach() for k, v in self.memory.items()}, self.segments, self.seen)


def run_segments(model, input_ids: torch.Tensor, segment_len: int, state: SegmentState | None = None,
                 grad_segments: int | None = None) -> tuple[torch.Tensor, SegmentState]:
    """input_ids [b, N] cut into segments of `segment_len` (the last may be shorter), each run by model.recur
    with the state of the one before. Returns the outputs concatenated along the sequence and the final state.
    grad_segments=k: gradients flow back through the memory of the last k segments only (RMT's BPTT depth);
    None: through all of them. XL's memory never carries a gradient (the paper's stop-gradient)."""
    if segment_len < 1:
        raise ValueError("segment_len must be at least 1")
    pieces = list(input_ids.split(segment_len, dim=1))
    outs = []
    for t, piece in enumerate(pieces):
        if state is not None and grad_segments is not None and t <= len(pieces) - grad_segments:
            state = state.detach()
        out, state = model.recur(piece, state)
        outs.append(out)
    return torch.cat(outs, dim=1), state
