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
    streams = {st.name: st.causal for st in graph.streams}
    first = graph.inputs[0]
    vocab = getattr(first.params, "vocab", None)
    try:
        for inp in graph.inputs:
            shape = inp.op.shape(inp.params, OpEnv(in_shapes=()))
            length = inp.meta.get("length", "n")
            inp.meta["shape"] = tuple(length if dim == "n" else dim for dim in shape)
        _infer(graph, c, _Where(causal, streams, vocab, {}), top=graph)
    except _Stop:
        _clear(graph)
        return
    _check_writes(graph, c)


def _check_writes(graph: Graph, c: Collector) -> None:
    """E310 for a stream that writes a carried stream (`next(writes=mem) = ...`) a value of another shape."""
    for st in graph.streams:
        if st.writes is None or st.writes_span is None:
            continue
        mem = graph.carried(st.writes)
        got, want = graph.node(st.value).meta["shape"], mem.meta["shape"]
        if tuple(got) != tuple(want):
            c.error("E310", f"stream '{st.name}' writes {fmt_shape(got)} to memory '{st.writes}' of {fmt_shape(want)}",
                    st.writes_span, help=f"the next segment reads it as '{st.writes}': keep its {want[1]} positions, "
                                         f"e.g. {st.name}(writes={st.writes}) = h -> slice(last={want[1]})")


class _Where:
    """What a node's checks depend on besides its inputs: the causality of its stream (the model's when it has
    no streams), the vocabulary, and per stream the position scheme applied inside attention from here on."""

    def __init__(self, causal: bool, streams: dict, vocab, pos: dict):
        self.causal, self.streams, self.vocab, self.pos = causal, streams, vocab, pos
        self.vocabs: dict = {}  # stream -> the vocabulary of the input it reads tokens from
        self.sets: dict = {}  # OpEnv field -> {stream: the latest op that sets it there (memory(xl))}

    def causal_of(self, n: Node) -> bool:
        return self.streams.get(n.meta.get("stream"), self.causal)


def _clear(graph: Graph) -> None:
    for n in graph.nodes:
        n.meta.pop("shape", None)
        if n.kind == "repeat":
            _clear(n.body)


def _infer(g: Graph, c: Collector, where: _Where, top: Graph):
    for n in g.nodes:
        if n.kind == "input":
            continue
        ins = [g.node(i).meta["shape"] for i in n.inputs]
        if n.kind == "call":
            if n.op.starts and not (g is top and g.node(n.inputs[0]).kind == "input"):
                c.error("E311", f"{n.op.id} begins a stream of its own", n.span,
                        help=f"it reads nothing from the stream before it: start a stream with it, "
                             f"name = {n.op.family}({n.op.variant}, ...), and join it (cat(prefix=name))")
                raise _Stop
            in_causal = tuple(where.causal_of(g.node(i)) for i in n.inputs)
            first = g.node(n.inputs[0]) if n.inputs else None  # a model input (features) needs no gradient
            _call(n, ins, c, where, in_causal, top, in_grad=not (first is not None and first.kind == "input"
                                                                  and first.variant is not None))
        elif n.kind == "add":
            if tuple(ins[0]) != tuple(ins[1]):
                c.error("E305", f"residual branch changes the shape: {fmt_shape(ins[0])} + {fmt_shape(ins[1])}",
                        n.span, help="a residual body must keep the stream's shape")
                raise _Stop
            n.meta["shape"] = ins[0]
        elif n.kind == "repeat":
            for inner, shape in zip(n.body.inputs, ins):
                inner.meta["shape"] = shape
            _infer(n.body, c, where, top)
            out = n.body.output.meta["shape"]
            if tuple(out) != tuple(ins[0]):
                c.error("E306", f"a repeated layer must keep its shape: {fmt_shape(ins[0])} -> {fmt_shape(out)}",
                        n.span, help="repeat(...) feeds each copy's output into the next copy")
                raise _Stop
            # reversible: the copies carry the pair (X1, X2), both x at the start; out comes concat(Y1, Y2)
            n.meta["shape"] = (*ins[0][:-1], 2 * ins[0][-1]) if n.reversible else ins[0]
        else:  # output
            n.meta["shape"] = ins[0]
    return None


def _call(n: Node, ins, c: Collector, where: _Where, in_causal: tuple, top: Graph, in_grad: bool = True):
    """where.pos[stream] is the pos(...) call whose scheme applies inside attention from here on (rope, alibi)."""
    op = n.op
    stream = n.meta.get("stream")
    causal = where.causal_of(n)
    pos_node = _pos(stream, top, where)
    pos = (pos_node.op, pos_node.params) if pos_node is not None else None
    mem_node = _pos(stream, top, where, "memory") if op.family == "mha" else None
    memory = (mem_node.op, mem_node.params) if mem_node is not None else None
    env = OpEnv(in_shapes=tuple(tuple(s) for s in ins), causal=causal, pos=pos, vocab=_vocab(n, top, where),
                residual_scores=n.residual_scores, in_causal=in_causal, memory=memory,
                stream=stream if top.streams else None, in_grad=in_grad)
    spans = n.meta.get("arg_spans", {})
    if causal and op.causal == "no":
        where_ = f"stream '{stream}' is causal" if top.streams else "the model is causal"
        c.error("E301", f"{op.id} has no causal form, but {where_}", n.span,
                help="it would let every position see the future: use another op, or "
                     + (f"{stream}(causal=false)" if top.streams else "model(causal=false)"))
    if op.family == "mha" and pos is not None and pos[0].variant not in op.supports:
        c.error("E302", f"{op.id} cannot apply pos({pos[0].variant})", n.span,
                help=f"{op.id} supports: {', '.join(sorted(op.supports - NOT_POSITIONS)) or 'no positions'}; "
                     f"pos({pos[0].variant}) works inside: {_taking(pos[0].variant)}")
    if memory is not None and "memory" not in op.supports:
        c.error("E302", f"{op.id} cannot keep {mem_node.op.id}'s memory", n.span,
                help="segment memory works with: " + ", ".join(
                    f"{o.family}({o.variant})" for o in _memory_ops()))
    elif memory is not None and pos is not None and not getattr(pos[0].attach, "relative", False):
        c.error("E302", f"{mem_node.op.id} cannot be combined with pos({pos[0].variant}) inside attention", n.span,
                help="positions that reach into the memory are relative: use pos(xl_rel), or none")
    if n.residual_scores and (memory is not None or (pos is not None and getattr(pos[0].attach, "relative", False))):
        c.error("E302", f"{op.id} cannot add residual scores on Transformer-XL's path", n.span,
                help="residual(..., scores=true) works with the other position schemes, without memory(xl)")
    if getattr(n.params, "tied", False):
        embed = next((m for m in top.nodes if m.kind == "call" and (m.family, m.variant) == ("embed", "token")),
                     None)
        if embed is n:
            c.error("E307", f"{op.id} is tied, but it is the model's first embed(token): the table is its own",
                    n.span, help="tie a later embed(token) (an encoder-decoder's target) to this one")
            raise _Stop
        if embed is None:
            c.error("E307", f"{op.id} is tied, but the model has no {'other ' if op.family == 'embed' else ''}"
                            "embed(token)", n.span,
                    help="set tied=false, or embed the tokens with embed(token)")
        elif ins and op.family == "head" and ins[0][-1] != embed.params.d_model:
            c.error("E308", f"{op.id} is tied to a [V, {embed.params.d_model}] embedding, but reads a stream of "
                            f"width {ins[0][-1]}", n.span,
                    help="set tied=false, or give the head the embedding's width")
            raise _Stop
        elif op.family == "embed" and (n.params.d_model != embed.params.d_model or env.vocab != embed.meta["env"].vocab):
            c.error("E308", f"{op.id} is tied to the first embed(token), [{embed.meta['env'].vocab}, "
                            f"{embed.params.d_model}], but is [{env.vocab}, {n.params.d_model}]", n.span,
                    help="tied embeddings share one vocabulary and width")
            raise _Stop
    try:
        shape = op.shape(n.params, env)
    except ShapeProblem as p:
        c.error(p.code, p.message, spans.get(p.field, n.span), help=p.hint)
        raise _Stop from None
    if op.family == "mha" and pos is not None and pos[0].variant in op.supports:
        try:  # the scheme's own checks against this attention's heads (e.g. rope's rotated channels)
            pos[0].attach(pos[1], n.params.heads, n.params.head_dim or env.d // n.params.heads)
        except ShapeProblem as p:
            c.error(p.code, p.message, pos_node.meta.get("arg_spans", {}).get(p.field, pos_node.span),
                    help=p.hint)
    n.meta["shape"], n.meta["env"] = tuple(shape), env
    if op.attach is not None:
        where.pos[stream] = n
    if op.sets is not None:
        where.sets.setdefault(op.sets, {})[stream] = n


NOT_POSITIONS = frozenset({"residual_scores", "memory"})  # what `supports` lists besides position schemes


def _taking(variant: str) -> str:
    """The attention ops that list position scheme `variant` in their `supports`."""
    from ..ops import REGISTRY
    return ", ".join(op.id for (f, _), op in sorted(REGISTRY.items()) if f == "mha" and variant in op.supports) \
        or "no attention"


def _memory_ops() -> list:
    from ..ops.registry import REGISTRY

    return [o for o in REGISTRY.values() if "memory" in o.supports]


def _pos(stream, top: Graph, where: _Where, what: str = "pos"):
    """The node that configures attention in `stream` (`what`: "pos", the scheme applied inside attention; or an
    OpEnv field an op `sets`, "memory"): the stream's own latest, else that of the stream it starts from
    (looked up once per stream)."""
    found = where.pos if what == "pos" else where.sets.setdefault(what, {})
    if stream not in found:
        st = top.stream(stream) if top.streams else None
        found[stream] = (_pos(st.source[1], top, where, what) if st is not None and st.source[0] == "stream"
                         else None)
    return found[stream]


def _vocab(n: Node, top: Graph, where: _Where):
    """The vocabulary of the input the node's stream reads tokens from (the model's first input's otherwise)."""
    stream = n.meta.get("stream")
    if stream not in where.vocabs:
        st = top.stream(stream) if top.streams else None
        if st is not None and st.source[0] == "stream":
            where.vocabs[stream] = _vocab(top.node(top.stream(st.source[1]).value), top, where)
        elif st is not None and st.source[0] == "input":
            where.vocabs[stream] = getattr(top.node(st.source[1]).params, "vocab", None)
        else:
            where.vocabs[stream] = where.vocab
    return where.vocabs[stream]
