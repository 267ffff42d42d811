"""slice(seq, first=k | last=k | drop_first=k | drop_last=k): positions kept along the sequence. `last` keeps the
last k (Perceiver AR's queries), `drop_first` drops a prefix (memory tokens before the head). The padding mask
is sliced with the positions. A length only known at run time (n) is checked then."""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost
from ..registry import Op, OpEnv, OpParams, ShapeProblem, add_len, register, right_padded

KINDS = ("first", "last", "drop_first", "drop_last")


class SliceParams(OpParams):
    first: int | None = Field(None, ge=1, description="keep the first k positions")
    last: int | None = Field(None, ge=1, description="keep the last k positions")
    drop_first: int | None = Field(None, ge=1, description="drop the first k positions")
    drop_last: int | None = Field(None, ge=1, description="drop the last k positions")


def _which(p: SliceParams) -> tuple[str, int]:
    given = [(k, getattr(p, k)) for k in KINDS if getattr(p, k) is not None]
    if len(given) != 1:
        raise ShapeProblem(f"slice(seq) takes one of {', '.join(KINDS)}, got {len(given) or 'none'}",
                           given[1][0] if len(given) > 1 else None, "e.g. slice(last=1024)")
    return given[0]


def shortest_input(p: SliceParams) -> int:
    """The fewest positions its stream must have: k to keep k, k + 1 to drop k."""
    kind, k = _which(p)
    return k + (1 if kind.startswith("drop") else 0)


def _shape(p: SliceParams, env: OpEnv):
    kind, k = _which(p)
    if len(env.shape) < 2:
        raise ShapeProblem("slice needs a [b, n, ...] stream")
    n = env.shape[1]
    keep = k if kind in ("first", "last") else None
    if isinstance(n, int) and (k > n or (keep is None and k == n)):
        raise ShapeProblem(f"slice({kind}={k}) is longer than its stream of {n} positions", kind,
                           f"the stream has {n} positions: {'keep at most ' + str(n) if keep else 'drop fewer'}")
    return (env.shape[0], keep if keep is not None else add_len(n, -k), *env.shape[2:])


class Slice(nn.Module):
    def __init__(self, p: SliceParams, env: OpEnv):
        super().__init__()
        self.kind, self.k = _which(p)

    def _cut(self, t: torch.Tensor) -> torch.Tensor:
        n, k = t.shape[1], self.k
        start, stop = {"first": (0, k), "last": (n - k, n), "drop_first": (k, n), "drop_last": (0, n - k)}[self.kind]
        if not isinstance(n, int) or torch.compiler.is_exporting():  # a view's layout would depend on n (is it
            # the whole sequence?), which an export for every n cannot know: gather the positions instead
            return t.index_select(1, torch.arange(start, stop, device=t.device))
        return t[:, start:stop]

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        if ctx is not None and ctx.cache is not None and ctx.offset:  # decoding after the prompt: the dropped
            ctx.offset -= self.k  # prefix was dropped then; the new positions all stay
            return x
        n = x.shape[1]
        if isinstance(n, int) and (self.k > n or (self.kind.startswith("drop") and self.k == n)):
            from ...diagnostics import Diagnostic, EvoError

            raise EvoError([Diagnostic("E410", f"slice({self.kind}={self.k}) of a sequence of {n} positions",
                                       help=f"the input must be longer than {self.k} positions"
                                       if self.kind.startswith("drop") else
                                       f"the input needs at least {self.k} positions")])
        if ctx is not None and ctx.mask is not None:
            ctx.mask = self._cut(ctx.mask)
            ctx.right_padded = right_padded(ctx.mask)
        return self._cut(x)


def cost(p: SliceParams, env: OpEnv, s) -> Cost:
    """A view of its input (no copy, no FLOP); backward writes the gradient into a zero tensor of the input's
    size."""
    return Cost(inplace=True, bwd_peak=s.b * s.n * env.d * s.bytes)


def _decode(p: SliceParams):
    """Dropping a prefix (memory tokens) decodes: the new positions all stay. Keeping the last k moves the window
    with every token (Perceiver AR), the first k or dropping the last k depends on the end: no step form."""
    return "the prefix is dropped at the prompt; every new position stays" if p.drop_first else None


OP = register(Op(
    decode=_decode, family="slice", variant="seq", params=SliceParams, module=Slice, causal="n.a.", shape=_shape,
    paper="Perceiver AR, Hawthorne et al. 2022, arXiv:2202.07765 (the last positions as queries)",
    summary="x[:, :k], x[:, -k:], x[:, k:] or x[:, :-k]", cost=cost,
))
