"""Shape pass: infers every value's symbolic shape ([b, n, d]) with each op's shape rule, and checks what
needs the whole graph: causality, which position scheme reaches which attention, residual and repeat shapes."""
from __future__ import annotations

from ..diagnostics import Collector
from ..ir import Graph, Node, fmt_shape
from ..ops.registry import OpEnv, ShapeProblem


class _Stop(Exception):
    """A shape could not be inferred; later shapes in this graph would only repeat the error."""


def infer_shapes(graph: Graph, c: Collector) -> None:
    causal = bool(graph.options.get("causal", False))
    inp = graph.input
    vocab = getattr(inp.params, "vocab", None)
    try:
        inp.meta["shape"] = inp.op.shape(inp.params, OpEnv(in_shapes=()))
        _infer(graph, c, causal, vocab, pos=None, top=graph)
    except _Stop:
        _clear(graph)


def _clear(graph: Graph) -> None:
    for n in graph.nodes:
        n.meta.pop("shape", None)
        if n.kind == "repeat":
            _clear(n.body)


def _infer(g: Graph, c: Collector, causal: bool, vocab, pos, top: Graph):
    for n in g.nodes[1:]:
        ins = [g.node(i).meta["shape"] for i in n.inputs]
        if n.kind == "call":
            pos = _call(n, ins, c, causal, vocab, pos, top)
        elif n.kind == "add":
            if tuple(ins[0]) != tuple(ins[1]):
                c.error("E305", f"residual branch changes the shape: {fmt_shape(ins[0])} + {fmt_shape(ins[1])}",
                        n.span, help="a residual body must keep the stream's shape")
                raise _Stop
            n.meta["shape"] = ins[0]
        elif n.kind == "repeat":
            n.body.input.meta["shape"] = ins[0]
            pos = _infer(n.body, c, causal, vocab, pos, top)
            out = n.body.output.meta["shape"]
            if tuple(out) != tuple(ins[0]):
                c.error("E306", f"a repeated layer must keep its shape: {fmt_shape(ins[0])} -> {fmt_shape(out)}",
                        n.span, help="repeat(...) feeds each copy's output into the next copy")
                raise _Stop
            n.meta["shape"] = ins[0]
        else:  # output
            n.meta["shape"] = ins[0]
    return pos


def _call(n: Node, ins, c: Collector, causal: bool, vocab, pos_node: Node | None, top: Graph):
    """`pos_node` is the pos(...) call whose scheme applies inside attention from here on (rope, alibi)."""
    op = n.op
    pos = (pos_node.op, pos_node.params) if pos_node is not None else None
    env = OpEnv(in_shapes=tuple(tuple(s) for s in ins), causal=causal, pos=pos, vocab=vocab,
                residual_scores=n.residual_scores)
    spans = n.meta.get("arg_spans", {})
    if causal and op.causal == "no":
        c.error("E301", f"{op.id} has no causal form, but the model is causal", n.span,
                help="it would let every position see the future: use another op, or model(causal=false)")
    if op.family == "mha" and pos is not None and pos[0].variant not in op.supports:
        c.error("E302", f"{op.id} cannot apply pos({pos[0].variant})", n.span,
                help=f"{op.id} supports: {', '.join(sorted(op.supports - {'residual_scores'})) or 'no positions'}")
    if getattr(n.params, "tied", False):
        embed = next((m for m in top.nodes if m.kind == "call" and (m.family, m.variant) == ("embed", "token")), None)
        if embed is None:
            c.error("E307", f"{op.id} is tied, but the model has no embed(token)", n.span,
                    help="set tied=false, or embed the tokens with embed(token)")
        elif ins and ins[0][-1] != embed.params.d_model:
            c.error("E308", f"{op.id} is tied to a [V, {embed.params.d_model}] embedding, but reads a stream of "
                            f"width {ins[0][-1]}", n.span,
                    help="set tied=false, or give the head the embedding's width")
            raise _Stop
    try:
        shape = op.shape(n.params, env)
    except ShapeProblem as p:
        c.error("E300", p.message, spans.get(p.field, n.span), help=p.hint)
        raise _Stop from None
    if op.family == "mha" and pos is not None and pos[0].variant in op.supports:
        try:  # the scheme's own checks against this attention's heads (e.g. rope's rotated channels)
            pos[0].attach(pos[1], n.params.heads, n.params.head_dim or env.d // n.params.heads)
        except ShapeProblem as p:
            c.error("E300", p.message, pos_node.meta.get("arg_spans", {}).get(p.field, pos_node.span),
                    help=p.hint)
    n.meta["shape"], n.meta["env"] = tuple(shape), env
    return n if op.attach is not None else pos_node
