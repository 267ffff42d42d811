"""The graph IR: a closed set of node kinds over an open op registry (after torch.fx).

Node kinds: input (the graph's argument), call (an op from the registry), add (residual sum of two values),
repeat (a body Graph applied `count` times, separate or shared weights), output. Passes write their results
into `node.meta` (shape, env). `str(graph)` prints it as text; `graph.lint()` checks its invariants.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import networkx as nx
from pydantic import BaseModel, ConfigDict, Field

from .diagnostics import Span
from .ops.registry import FAMILIES, OpParams, lookup

NodeKind = Literal["input", "call", "add", "repeat", "output"]
KINDS = ("input", "call", "add", "repeat", "output")


class Node(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str  # value name, printed as %name
    kind: NodeKind
    inputs: list[str] = Field(default_factory=list)
    family: str | None = None  # call: op family ("mha"); input: "input"
    variant: str | None = None  # call: op variant ("softmax")
    params: OpParams | None = None  # call: validated params
    module: str | None = None  # name of the built submodule in its scope ("attn" -> blocks.0.attn.q_proj)
    body: Graph | None = None  # repeat
    count: int = 1  # repeat
    shared: bool = False  # repeat: one set of weights used `count` times
    reversible: bool = False  # repeat: RevNet pairs (X1, X2) -> (X1 + F(X2), X2 + G(Y1)), output [Y1, Y2] (2d)
    residual_scores: bool = False  # call[mha] inside residual(..., scores=true) (RealFormer)
    span: Span | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @property
    def op(self):
        return lookup(self.family, self.variant) if self.family and self.variant else None


def fmt_shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _fmt_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


@dataclass
class Stream:
    """A named stream of a model with streams: its last value, causality, what it starts from (("input",
    node), ("stream", name) or ("latent", None): an op that begins a stream, latent(array) or memory(rmt)), its
    first value (`start`), and the carried stream (memory(rmt)) whose next-segment value it gives, if any."""

    name: str
    value: str
    causal: bool
    source: tuple
    start: str
    writes: str | None = None
    writes_span: object = None  # the span of `writes=NAME`, for the shape pass's diagnostic


class Graph:
    """An ordered list of nodes (topological by construction) over a networkx DiGraph of data edges. Input nodes
    come first: the model's inputs, or a repeat body's input and the streams it reads."""

    def __init__(self, name: str, options: dict | None = None):
        self.name = name
        self.options = dict(options or {})  # model options: causal, ...
        self.streams: list[Stream] = []  # a model with streams: each, in order (the last is the output)
        self.nodes: list[Node] = []
        self.nx = nx.DiGraph()
        self._counter = 0
        self.source, self.file = "", "<string>"  # set by evodsl.parse

    def fresh(self, prefix: str = "h") -> str:
        self._counter += 1
        return f"{prefix}{self._counter}"

    def add(self, node: Node) -> Node:
        self.nodes.append(node)
        self.nx.add_node(node.name, node=node)
        for src in node.inputs:
            self.nx.add_edge(src, node.name)
        return node

    def insert_input(self, node: Node) -> Node:
        """Add an input node after the other inputs."""
        k = next((i for i, n in enumerate(self.nodes) if n.kind != "input"), len(self.nodes))
        self.nodes.insert(k, node)
        self.nx.add_node(node.name, node=node)
        return node

    @property
    def inputs(self) -> list[Node]:
        return [n for n in self.nodes if n.kind == "input"]

    def static_streams(self) -> set[str]:
        """In a model with two inputs, the streams that do not start from the second (the target) or from a
        stream that does: an encoder's, computed once when decoding (no decoding state of their own)."""
        if len(self.inputs) < 2:
            return set()
        target, dynamic = self.inputs[1].name, set()
        for st in self.streams:
            if (st.source[0] == "input" and st.source[1] == target) or (st.source[0] == "stream"
                                                                          and st.source[1] in dynamic):
                dynamic.add(st.name)
        return {st.name for st in self.streams} - dynamic

    def carried(self, stream: str) -> "Node | None":
        """The call that begins `stream` if its value is carried across segments (memory(rmt)), else None."""
        return next((n for n in self.nodes if n.kind == "call" and n.meta.get("stream") == stream and n.op.carried),
                    None)

    def stream(self, name: str) -> Stream | None:
        if len(getattr(self, "_stream_index", ())) != len(self.streams):
            self._stream_index = {s.name: s for s in self.streams}
        return self._stream_index.get(name)

    def node(self, name: str) -> Node:
        return self.nx.nodes[name]["node"]

    @property
    def input(self) -> Node:
        return self.nodes[0]

    @property
    def output(self) -> Node:
        return self.nodes[-1]

    def calls(self, recursive: bool = True):
        """Every call node, descending into repeat bodies (each body once)."""
        for n in self.nodes:
            if n.kind == "call":
                yield n
            elif n.kind == "repeat" and recursive:
                yield from n.body.calls()

    # ------------------------------------------------------------------ printing

    def _lines(self, indent: str) -> list[str]:
        out = []
        for n in self.nodes:
            args = ", ".join(f"%{i}" for i in n.inputs)
            if n.kind == "call":
                fields, given = type(n.params).model_fields, n.meta.get("arg_spans", {})
                extra = [f"{k}={_fmt_value(v)}" for k, v in n.params.model_dump().items()
                         if k in given or fields[k].is_required() or fields[k].default != v]
                if n.residual_scores:
                    extra.append("residual_scores=true")
                text = f"call[{n.family}]({', '.join([args, n.variant] + extra) if args else ', '.join([n.variant] + extra)})"
            elif n.kind == "input":
                given = ", ".join(f"{k}={_fmt_value(v)}" for k, v in n.params.model_dump().items()) if n.params else ""
                text = f"input[{n.variant}]({given})" if n.variant else "input()"
            elif n.kind == "repeat":
                text = (f"repeat[{n.count}{', shared' if n.shared else ''}"
                        f"{', reversible=true' if n.reversible else ''}]({args})")
            else:
                text = f"{n.kind}({args})"
            line = f"{indent}%{n.name} = {text}"
            notes = []
            if "shape" in n.meta:
                notes.append(fmt_shape(n.meta["shape"]))
            if n.module and n.kind in ("call", "repeat"):
                notes.append(n.module)
            if notes:
                line = f"{line:<64}  # {'  '.join(notes)}"
            out.append(line.rstrip())
            if n.kind == "repeat":
                out.extend(n.body._lines(indent + "    "))
            for st in (s for s in self.streams if s.value == n.name):
                out.append(f"{indent}# stream {st.name} = %{st.value}  ({'causal' if st.causal else 'bidirectional'}"
                           f"{', ' + fmt_shape(n.meta['shape']) if 'shape' in n.meta else ''})")
        return out

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={_fmt_value(v)}" for k, v in self.options.items())
        return "\n".join([f"graph {self.name}({opts}):"] + self._lines("  "))

    # ------------------------------------------------------------------ invariants

    def lint(self) -> None:
        """Raise AssertionError if an invariant of the IR is broken (a compiler bug, never a user error)."""
        assert self.nodes and self.nodes[0].kind == "input", f"{self.name}: first node must be input"
        assert self.nodes[-1].kind == "output", f"{self.name}: last node must be output"
        assert nx.is_directed_acyclic_graph(self.nx), f"{self.name}: cycle"
        seen: set[str] = set()
        modules: set[str] = set()
        inputs_done = False
        for n in self.nodes:
            assert n.kind in KINDS, f"unknown node kind {n.kind}"
            assert n.name not in seen, f"duplicate value %{n.name}"
            for i in n.inputs:
                assert i in seen, f"%{n.name} uses %{i} before it is defined"
            seen.add(n.name)
            want = {"input": 0, "output": 1, "add": 2}.get(n.kind)
            if want is not None:
                assert len(n.inputs) == want, f"%{n.name}: {n.kind} takes {want} inputs"
            if n.kind == "input":
                assert inputs_done is False, f"%{n.name}: input nodes come first"
            else:
                inputs_done = True
            if n.kind == "call":
                op = n.op
                assert op is not None, f"%{n.name}: unregistered op {n.family}({n.variant})"
                assert isinstance(n.params, op.params), f"%{n.name}: params are not {op.params.__name__}"
                assert (len(n.inputs) >= 2) if op.inputs == -1 else len(n.inputs) == op.arity(n.params), \
                    f"%{n.name}: arity"
                assert n.family in FAMILIES
            if n.kind in ("call", "repeat"):
                assert n.module and n.module not in modules, f"%{n.name}: module name {n.module!r} not unique"
                modules.add(n.module)
            if n.kind == "repeat":
                assert n.body is not None and n.count >= 1
                assert len(n.inputs) == len(n.body.inputs), f"%{n.name}: one input per input of its body"
                n.body.lint()
        for st in self.streams:
            assert st.value in seen and st.start in seen, f"stream {st.name}: unknown values"
        shaped = ["shape" in n.meta for n in self.nodes]
        assert all(shaped) or not any(shaped), f"{self.name}: shapes inferred for some nodes only"


Node.model_rebuild()
