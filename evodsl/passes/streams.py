"""Streams for the build pass: `model NAME { a = ...  b = ... }`. Each stream is a pipeline that starts from an
input (the first is the model's `input_ids`, the second its `decoder_input_ids`), from an earlier stream by name,
or from a latent array; ops that name a stream (xattn(kv=a), cat(prefix=a)) take its value as an extra input,
and a repeat body that reads a stream captures it as an extra input node. The last stream is the model's output.
Causality is per stream: declared (`tgt(causal=true) = ...`), else the stream it starts from, else the model's.
A stream declared `next(writes=mem) = ...` gives the value that a carried stream (`mem = memory(rmt, ...)`) has at
the next segment (model.recur).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..diagnostics import Span, did_you_mean
from ..ir import Graph, Node, Stream
from ..ops.registry import FAMILIES, REGISTRY, variants
from ..ops.registry import lookup as lookup_op
from ..syntax import Call, ModelDef, Name

INPUT_NAMES = ("input_ids", "decoder_input_ids")  # the model's inputs, in the order their streams are defined
LENGTHS = ("n", "m")  # their sequence lengths


@dataclass
class _StreamState:
    name: str
    span: Span
    name_span: Span
    causal: bool
    value: str | None = None  # the stream's last value in the top graph, once defined
    used: bool = False
    reads: list = field(default_factory=list)  # (stream name, span) of every stream it reads
    writes: tuple | None = None  # (carried stream's name, span) it gives the next segment's value of
    after_causal: str | None = None  # declared causal=false, starting from this causal stream (DecBERT)


class Streams:
    """The Builder's stream wiring. `_model_streams` builds a model with streams; `_stream_inputs` is called by
    Layers._emit_call for each op that names streams."""

    _streams: dict | None = None  # name -> _StreamState while a model with streams is built; None otherwise
    _current: str | None = None  # the stream being built
    _scopes: list  # [(graph, {stream: (input node name, span)})]: the top graph, then each repeat body being built
    _all_stream_names: list
    _stream_lines: dict

    def _model_streams(self, m: ModelDef, opts: dict) -> Graph | None:
        g = Graph(m.name, opts)
        self._streams, self._scopes = {}, [(g, {})]
        self._all_stream_names = [sd.name for sd in m.streams]
        self._stream_lines = {sd.name: sd.span.line for sd in m.streams}
        if not self._names_free(m):
            return None
        flat = {sd.name: self._flatten(sd.body) for sd in m.streams}
        inputs = self._inputs(m, flat, g)
        if inputs is None:
            return None
        errors = len(self.c.items)
        for sd in m.streams:
            if not self._build_stream(sd, flat[sd.name], inputs, opts, g):
                return None
        self._current = None
        self._check_reads(m, errors)
        self._check_writes(m, g)
        g.add(Node(name="out", kind="output", inputs=[g.streams[-1].value]))
        return g

    def _names_free(self, m: ModelDef) -> bool:
        """E206 for two streams of one name, E209 for a stream named as an op, a binding or a definition."""
        seen: dict[str, Span] = {}
        for sd in m.streams:
            clash = ("an op" if sd.name in FAMILIES else "a binding" if sd.name in self.bindings
                     else "a layer definition" if sd.name in self.defs else None)
            if sd.name in seen:
                self.c.error("E206", f"two streams are named '{sd.name}'", sd.name_span,
                             help=f"the first is at line {seen[sd.name].line}; give each stream its own name")
                return False
            if clash:
                self.c.error("E209", f"stream '{sd.name}' has the name of {clash}", sd.name_span,
                             help=f"pick another name, e.g. '{sd.name}_stream'")
                return False
            seen[sd.name] = sd.span
        return True

    def _inputs(self, m: ModelDef, flat: dict, g: Graph) -> list[Node] | None:
        """The model's input nodes, one per stream that starts with input(...), in order, made first: a latent
        array (which may come before them) reads the batch size from the first."""
        inputs: list[Node] = []
        for sd in m.streams:
            first = flat[sd.name][0]
            if isinstance(first, Call) and first.name == "input":
                if len(inputs) == len(INPUT_NAMES):
                    self.c.error("E217", f"a model takes at most {len(INPUT_NAMES)} inputs", first.span,
                                 help="start this stream from an earlier one by name, or from latent(array, ...)")
                    return None
                node = self._input_node(first, INPUT_NAMES[len(inputs)], LENGTHS[len(inputs)])
                if node.params is None:
                    return None
                node.meta["stream"] = sd.name
                g.insert_input(node)
                inputs.append(node)
        if not inputs:
            self.c.error("E217", "a model starts with its input", m.streams[0].span,
                         help="one stream starts with `input(tokens, vocab=V)` or `input(features, d=D)`")
            return None
        return inputs

    def _build_stream(self, sd, items: list, inputs: list[Node], opts: dict, g: Graph) -> bool:
        """Emit one stream's pipeline into g from where it starts; False after an error."""
        options = self._kwargs(sd.options, {"causal": bool, "writes": str}, f"stream '{sd.name}'")
        declared = options.get("causal")
        st = _StreamState(sd.name, sd.span, sd.name_span, bool(opts.get("causal")), writes=options.get("writes"))
        if st.writes is not None:
            st.used = True  # the next segment reads it
        self._streams[sd.name] = st
        self._current = sd.name
        first, start = items[0], len(g.nodes)
        fname = first.id if isinstance(first, Name) else first.name if isinstance(first, Call) else None
        own = next((n for n in inputs if n.meta["stream"] == sd.name), None)
        if own is not None:
            x, rest, source = own.name, items[1:], ("input", own.name)
        elif fname in self._streams or fname in self._all_stream_names:
            x = self._stream_value(fname, 0, first.span)
            if x is None:
                return False
            rest, source = items[1:], ("stream", fname)
            st.causal = self._streams[fname].causal
        elif _starting_op(first) is not None:
            x, rest, source = inputs[0].name, items, ("latent", None)  # it reads the batch size only
        else:
            self.c.error("E217", "a stream starts with input(...), an earlier stream's name, or an op that begins "
                                 "one: " + ", ".join(o.id for o in REGISTRY.values() if o.starts), first.span,
                         help=f"streams defined so far: {', '.join(self._streams) or 'none'}")
            return False
        if declared is not None:
            st.causal = declared[0]
            if source[0] == "stream" and not st.causal and self._streams[fname].causal:
                st.after_causal = fname  # its bidirectional layers follow causal ones: no E309 for its start
        st.value = self._emit_items(rest, g, x, wire=True)
        for n in g.nodes[start:]:
            _tag(n, sd.name)
        g.streams.append(Stream(sd.name, st.value, st.causal, source, start=x,
                                writes=st.writes[0] if st.writes else None))
        return True

    def _check_writes(self, m: ModelDef, g: Graph) -> None:
        """Each carried stream (memory(rmt)) is written by exactly one stream, not the model's output (E226 for a
        write to anything else, E227 for a carried stream no one writes). Shapes are compared by the shape pass."""
        carried = [st.name for st in g.streams if g.carried(st.name) is not None]  # in stream order
        last = m.streams[-1].name
        writers: dict[str, str] = {}
        for st in self._streams.values():
            if st.writes is None:
                continue
            target, span = st.writes
            if not isinstance(target, str) or target not in self._streams:
                self.c.error("E225", f"unknown stream '{target}'", span,
                             help=did_you_mean(str(target), carried) or "writes= names a stream of this model "
                                  "that starts with memory(rmt, length=m)")
            elif target == st.name:
                self.c.error("E226", f"stream '{st.name}' writes itself", span,
                             help=f"a stream gives the next segment's value of a memory: {target}(writes=mem) = ...")
            elif target not in carried:
                self.c.error("E226", f"stream '{target}' is not carried from one segment to the next", span,
                             help="writes= gives the next segment's value of a stream that starts with "
                                  "memory(rmt, length=m)")
            elif target in writers:
                self.c.error("E226", f"memory '{target}' is written by two streams, '{writers[target]}' and "
                                     f"'{st.name}'", span, help="one stream gives its next value")
            elif self._all_stream_names.index(st.name) < self._all_stream_names.index(target):
                self.c.error("E226", f"stream '{st.name}' writes memory '{target}', which is defined after it", span,
                             help=f"define '{st.name}' after '{target}' (it gives the value of the next segment)")
            elif st.name == last:
                self.c.error("E226", f"the model's output stream '{st.name}' cannot write memory '{target}'", span,
                             help=f"give the write a stream of its own before the output: "
                                  f"next(writes={target}) = ...")
            else:
                writers[target] = st.name
                g.stream(st.name).writes_span = span
        for name in carried:  # no E227 where a write to it was refused above
            if not any(s.writes and s.writes[0] == name for s in self._streams.values()):
                st = self._streams[name]
                self.c.error("E227", f"memory '{name}' is never written", st.name_span,
                             help=f"declare the stream that gives its next value, e.g. "
                                  f"next(writes={name}) = h -> slice(last=m), where h is the stream that reads it")

    def _check_reads(self, m: ModelDef, errors: int) -> None:
        """E309 for a bidirectional stream that reads a causal one, but for the model's output stream declared
        `causal=false` starting from a causal one (causal layers, then bidirectional ones: DecBERT; no stream reads
        the output, so no causal stream can see a future through it); E222 for a stream no one reads (unless an
        error above already explains it)."""
        last = m.streams[-1].name
        for st in self._streams.values():
            for read, span in st.reads:
                if not st.causal and self._streams[read].causal and (read != st.after_causal or st.name != last):
                    self.c.error("E309", f"stream '{st.name}' is bidirectional but reads causal stream '{read}'",
                                 span, help=f"every position of '{st.name}' would see the future of '{read}': "
                                            f"declare {st.name}(causal=true) = ...")
            if not st.used and st.name != last and len(self.c.items) == errors:
                self.c.error("E222", f"stream '{st.name}' is defined and never used", st.name_span,
                             help="read it (xattn(softmax, kv=NAME), cat(prefix=NAME)) or start a stream from "
                                  f"it; the model's output is its last stream, '{last}'")

    def _input_node(self, first: Call, name: str, length: str) -> Node:
        variant = self._variant(first, FAMILIES["input"])
        op = lookup_op("input", variant) if variant else None
        if variant and op is None:
            self.c.error("E202", f"unknown variant '{variant}' for op 'input'", first.args[0].span,
                         help=did_you_mean(variant, variants("input")))
        params, spans = self._params(op, first) if op else (None, {})  # None: the error is reported
        return Node(name=name, kind="input", family="input", variant=variant, params=params, span=first.span,
                    meta={"arg_spans": spans, "length": length})

    def _stream_inputs(self, op, params, call: Call) -> list[str] | None:
        """The values of the streams `call` names (op.streams), in the scope being built; None after an error."""
        names = [(f, getattr(params, f)) for f in op.streams if getattr(params, f, None) is not None]
        if not names or self._opaque:
            return []  # a definition checked on its own: its streams are wired where a model uses it
        out = []
        for f, name in names:
            span = _kwarg_span(call, f)
            if self._streams is None:
                self.c.error("E223", f"{op.id} reads stream '{name}', but this model has one stream", span,
                             help="name the model's streams: model NAME { src = input(tokens) -> ...  "
                                  f"tgt = input(tokens) -> ... -> {op.family}({op.variant}, {f}=src) }}")
                return None
            value = self._stream_value(name, len(self._scopes) - 1, span)
            if value is None:
                return None
            out.append(value)
        return out

    def _stream_value(self, name: str, depth: int, span: Span) -> str | None:
        """The value of stream `name` in scope `depth` (0: the top graph), captured into repeat bodies."""
        st = self._streams.get(name)
        if name == self._current:
            self.c.error("E224", f"stream '{name}' is used inside its own definition", span,
                         help="a stream can read streams defined before it")
            return None
        if st is None or st.value is None:
            later = name in self._all_stream_names
            line = self._stream_lines.get(name)
            self.c.error("E224" if later else "E225",
                         f"stream '{name}' is used before it is defined" if later else f"unknown stream '{name}'",
                         span, help=f"it is defined at line {line}; streams are defined in order, each reading those "
                                    f"above it" if later else
                         did_you_mean(name, [s for s, v in self._streams.items() if v.value is not None])
                         or "no stream is defined before this one")
            return None
        if depth == 0:
            st.used = True
            self._streams[self._current].reads.append((name, span))
            return st.value
        body, captured = self._scopes[depth]
        if name not in captured:
            taken = {n.name for n in body.nodes}
            node_name = name if name not in taken and not re.fullmatch(r"h\d+|x|out", name) else f"{name}_in"
            body.insert_input(Node(name=node_name, kind="input", meta={"stream": name}))
            captured[name] = (node_name, span)
        return captured[name][0]

    def _body_streams(self, depth: int) -> list[str] | None:
        """The values, one scope up, of the streams the body at `depth` captured (the repeat's extra inputs)."""
        _, captured = self._scopes[depth]
        values = [self._stream_value(name, depth - 1, span) for name, (_, span) in captured.items()]
        return None if None in values else values


def _starting_op(first):
    """The op of `first` if it begins a stream of its own (latent(array), memory(rmt)), else None."""
    if not isinstance(first, Call) or first.name not in FAMILIES:
        return None
    fam = FAMILIES[first.name]
    variant = first.args[0].id if first.args and isinstance(first.args[0], Name) else fam.default
    op = lookup_op(first.name, variant) if variant else None
    return op if op is not None and op.starts else None


def _tag(n: Node, stream: str) -> None:
    n.meta.setdefault("stream", stream)
    if n.kind == "repeat":
        for m in n.body.nodes:
            _tag(m, stream)


def _kwarg_span(call: Call, field: str) -> Span:
    kw = next((k for k in call.kwargs if k.name == field), None)
    return kw.value.span if kw is not None else call.span
