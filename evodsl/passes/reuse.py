"""Reuse pass: each mha(skip_reuse) reads the output of the previous attention sublayer in its stream (Skip-
Attention). It finds that attention, the nearest earlier mha call in the same stream (through a repeat, for its
second and later copies, the previous copy's last one, a skip_reuse included), marks it `meta["reused"]` so that
the torch lowering hands its output over at run time, and reports a skip_reuse with none before it (E312)."""
from __future__ import annotations

from ..diagnostics import Collector
from ..ir import Graph


def link_reuse(graph: Graph, c: Collector) -> None:
    _walk(graph, {}, c, None, report=True)


def _walk(g: Graph, last: dict, c: Collector, stream, report: bool) -> None:
    """`last`: stream -> the latest mha node run before this point (in execution order)."""
    for n in g.nodes:
        where = n.meta.get("stream", stream)
        if n.kind == "call" and n.family == "mha":
            if n.variant == "skip_reuse":
                source = last.get(where)
                if source is not None:
                    source.meta["reused"] = True
                elif report:
                    c.error("E312", "mha(skip_reuse) has no earlier attention to reuse"
                            + (f" in stream '{where}'" if where else ""), n.span,
                            label="it reads the output of the previous attention sublayer",
                            help="put a layer with attention before it, e.g. norm -> mha -> norm -> ffn -> "
                                 "norm -> mha(skip_reuse) -> norm -> ffn")
            last[where] = n
        elif n.kind == "repeat":
            _walk(n.body, last, c, where, report)
            if n.count > 1:  # the second copy onwards: after the body's own last attention
                _walk(n.body, last, c, where, report=False)
