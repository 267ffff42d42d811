"""cat(seq, prefix=A, suffix=B): the stream with named streams joined before and/or after it along the sequence,
[b, n_A + n + n_B, d]: memory tokens (Burtsev et al. 2020) and global tokens (ETC, BigBird) as a prefix of the
sequence. The padding mask goes with the positions: the joined streams' own (a latent array's: every position
real)."""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost
from ..registry import Op, OpEnv, OpParams, ShapeProblem, add_len, register, right_padded


class CatParams(OpParams):
    prefix: str | None = Field(None, description="the stream joined before this one")
    suffix: str | None = Field(None, description="the stream joined after this one")


def _shape(p: CatParams, env: OpEnv):
    if p.prefix is None and p.suffix is None:
        raise ShapeProblem("cat(seq) joins nothing", hint="name a stream: cat(prefix=mem) or cat(suffix=mem)")
    shapes = env.in_shapes
    names = ["this stream"] + [f"'{n}'" for n in (p.prefix, p.suffix) if n is not None]
    if any(len(sh) != 3 for sh in shapes):
        raise ShapeProblem("cat joins [b, n, d] streams, got " + ", ".join(
            f"{w} [{', '.join(map(str, sh))}]" for w, sh in zip(names, shapes)))
    widths = {sh[-1] for sh in shapes}
    if len(widths) > 1:
        field = "prefix" if p.prefix is not None and shapes[1][-1] != shapes[0][-1] else "suffix"
        raise ShapeProblem("cat joins streams of different widths: " + ", ".join(
            f"{w} has width {sh[-1]}" for w, sh in zip(names, shapes)), field,
            "streams joined along the sequence need one width: project one, e.g. with embed(linear, d_model=D)")
    return (shapes[0][0], add_len(*(sh[1] for sh in shapes)), shapes[0][-1])


class Concat(nn.Module):
    def __init__(self, p: CatParams, env: OpEnv):
        super().__init__()
        self.prefix, self.suffix = p.prefix, p.suffix

    def forward(self, x: torch.Tensor, ctx, *joined: torch.Tensor) -> torch.Tensor:
        names = [n for n in (self.prefix, self.suffix) if n is not None]
        parts = dict(zip(names, joined))
        if ctx is not None and ctx.cache is not None and ctx.offset:  # decoding after the prompt: the prefix is
            ctx.offset += parts[self.prefix].shape[1]  # in every cache already; the new tokens come after it
            return x
        order = [(self.prefix, parts.get(self.prefix)), (None, x), (self.suffix, parts.get(self.suffix))]
        order = [(name, t) for name, t in order if t is not None]
        if ctx is not None:
            masks = [ctx.mask if name is None else ctx.streams.get(name, (None, False))[0] for name, _ in order]
            if any(m is not None for m in masks):
                ctx.mask = torch.cat([torch.ones(t.shape[:2], dtype=torch.bool, device=t.device) if m is None else m
                                      for m, (_, t) in zip(masks, order)], dim=1)
                ctx.right_padded = right_padded(ctx.mask)
        return torch.cat([t for _, t in order], dim=1)


def cost(p: CatParams, env: OpEnv, s) -> Cost:
    """A copy (no FLOP); backward slices the gradient (views) for each part."""
    return Cost(bwd_peak=0)


def _decode(p: CatParams):
    """A prefix is joined at the prompt (then cached); the new tokens come after it. A suffix would have to move."""
    return None if p.suffix is not None else "the prefix joins the prompt; later tokens follow it in the caches"


OP = register(Op(
    decode=_decode, family="cat", variant="seq", params=CatParams, module=Concat, causal="n.a.", shape=_shape,
    streams=("prefix", "suffix"),
    paper="Memory Transformer, Burtsev et al. 2020, arXiv:2006.11527 (memory tokens as a prefix)",
    summary="[prefix; x; suffix] along the sequence", cost=cost,
))
