"""Build pass: AST -> Graph.

Reads the statements (bindings, definitions, the model), resolves names, evaluates hyperparameter arithmetic,
and wires the model; the layers themselves (definitions inlined, the sublayer rule, residual, parallel and
repeat, op calls validated) are passes/layers.py. Every problem is collected; the caller raises them together.
"""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from .. import init as init_schemes
from ..diagnostics import Collector, Span, did_you_mean
from ..ir import Graph, Node
from ..ops.registry import FAMILIES
from ..ops.registry import lookup as lookup_op
from ..syntax import Assign, Call, ModelDef, Name, Parallel, Pipe, Program, Repeat, Residual
from .layers import Layers, name_modules
from .streams import Streams
from .values import _ERR, Binding

DEFAULT_D_MODEL = 512  # width of a layer compiled on its own when the spec binds no d_model


@dataclass
class Definition:
    expr: object
    span: Span


class Builder(Streams, Layers):
    def __init__(self, program: Program, overrides: dict | None = None):
        self.program = program
        self.overrides = dict(overrides or {})  # binding name -> value that replaces the spec's
        self.c = Collector(program.source)
        self.bindings: dict[str, Binding] = {}
        self.failed: set[str] = set()  # bindings whose value had an error (already reported): no follow-on errors
        self.defs: dict[str, Definition] = {}
        self.models: list[ModelDef] = []
        self._expanding: list[str] = []
        self._sizes: dict[str, int] = {}  # definition -> nodes it expands to (Layers._size)
        self._forward: set[str] = set()  # names used by definitions before they were defined (E201 there)
        self._opaque = False  # validating a definition: the definitions it uses were validated already
        self._in_scores = 0  # depth of residual(..., scores=true): there, definitions are expanded
        self._calls: dict = {}  # (span and name of a call, bindings so far) -> its validated (variant, params, spans)
        self._scores: list[list] = []  # stack: mha nodes inside residual(..., scores=true)
        self._streams = None  # a model with streams, while it is built (passes/streams.py)
        self._scopes: list = []

    # ------------------------------------------------------------------ statements

    def run(self) -> Graph | None:
        for st in self.program.statements:
            if isinstance(st, ModelDef):
                self.models.append(st)
                continue
            if not self._declare(st):
                continue
            if self._is_layer(st.value):
                if self._self_reference(st) is not None:  # reported; a stored definition is never recursive
                    self.failed.add(st.name)
                    continue
                self.defs[st.name] = Definition(st.value, st.span)
                if any(_ref_name(r) in self.failed for r in _layer_refs(st.value)):
                    self.failed.add(st.name)  # built on a rejected definition: that one's error says it
                    continue
                if self._too_big(st.value, f"'{st.name}'", st.name_span):
                    self.failed.add(st.name)  # reported once; its users are not expanded either
                    continue
                self._forward |= {_ref_name(r) for r in _layer_refs(st.value)} - self.defs.keys() - FAMILIES.keys()
                self._opaque = True  # validate it even if never used, its inner definitions left unexpanded
                try:
                    self._emit(st.value, self._scratch(), "x", wire=True)
                finally:
                    self._opaque = False
            else:
                v = self.overrides.pop(st.name) if st.name in self.overrides else self._eval(st.value)
                if v is not _ERR:
                    self.bindings[st.name] = Binding(v, st.span)
                else:
                    self.failed.add(st.name)
        if len(self.models) > 1:
            m = self.models[1]
            self.c.error("E218", "a spec defines one model", m.name_span,
                         help=f"the first model is '{self.models[0].name}' at line {self.models[0].span.line}")
        if self.models:
            return self._model(self.models[0])
        if self.defs:
            return self._standalone(list(self.defs)[-1])
        if self.c.items:  # the layers were rejected (E206, E209): "nothing to build" would only repeat that
            return None
        end = self.program.source.count("\n") + 1
        self.c.error("E219", "nothing to build: the spec defines no model and no layer",
                     Span(self.program.file, 1, 1, 1, 1),
                     help="write `model lm = input(tokens, vocab=V) -> ...` or a layer `block = ...`"
                     if end else "")
        return None

    def _declare(self, st: Assign) -> bool:
        name = st.name
        if name in FAMILIES:
            self.c.error("E209", f"'{name}' is the name of an op", st.name_span,
                         help=f"pick another name, e.g. '{name}_block'")
            return False
        prev = self.bindings.get(name) or self.defs.get(name)
        if prev is not None:
            self.c.error("E206", f"'{name}' is defined twice", st.name_span,
                         help=f"first defined at line {prev.span.line}")
            return False
        return True

    def _self_reference(self, st: Assign):
        """E207: the reference in `st.value` through which definition `st.name` would use itself, or None."""
        seen: set[str] = set()

        def uses(name: str) -> bool:
            if name == st.name:
                return True
            if name not in self.defs or name in seen:
                return False
            seen.add(name)
            return any(uses(_ref_name(r)) for r in _layer_refs(self.defs[name].expr))

        # A stored definition can reach st.name only if some definition used it before it was defined; else
        # only a direct use is recursive (and the search stays linear in the spec).
        reaches = uses if st.name in self._forward else (lambda name: name == st.name)
        ref = next((r for r in _layer_refs(st.value) if reaches(_ref_name(r))), None)
        if ref is not None:
            via = "" if _ref_name(ref) == st.name else f"'{_ref_name(ref)}' uses '{st.name}'; "
            self.c.error("E207", f"'{st.name}' is defined in terms of itself",
                         ref.span if isinstance(ref, Name) else ref.name_span,
                         help=f"{via}definitions cannot be recursive; use repeat(...) for depth")
        return ref

    def _is_layer(self, expr) -> bool:
        if isinstance(expr, (Pipe, Residual, Parallel, Repeat, Call)):
            return True
        if isinstance(expr, Name):
            return expr.id not in self.bindings and expr.id not in self.failed  # unknown names are reported as unknown ops by _emit
        return False

    # ------------------------------------------------------------------ layers

    def _scratch(self) -> Graph:
        g = Graph("scratch")
        g.add(Node(name="x", kind="input"))
        return g

    # ------------------------------------------------------------------ targets

    def _model(self, m: ModelDef) -> Graph | None:
        opts = {k: v for k, (v, _) in self._kwargs([k for k in m.options if k.name != "init"],
                                                   {"causal": bool, "init": None}, "model").items()}
        opts.setdefault("causal", self._binding_bool("causal"))
        inits = [k for k in m.options if k.name == "init"]
        for k in inits[1:]:
            self.c.error("E206", "parameter 'init' is given twice", k.name_span)
        if inits and (init := self._init(inits[0].value)) is not None:
            opts["init"] = init
        if m.streams:
            if any(self._too_big(sd.body, f"stream '{sd.name}'", sd.name_span) for sd in m.streams):
                return None
            g = self._model_streams(m, opts)
            if g is not None:
                name_modules(g)
            return g
        g = Graph(m.name, opts)
        if self._too_big(m.body, f"model '{m.name}'", m.name_span):
            return None
        items = self._flatten(m.body)
        first = items[0]
        if not (isinstance(first, Call) and first.name == "input"):
            self.c.error("E217", "a model starts with its input", first.span,
                         help="write `model NAME = input(tokens, vocab=V) -> ...` or input(features, d=D)")
            return None
        g.add(self._input_node(first, "x", "n"))
        out = self._emit_items(items[1:], g, "x", wire=True)
        g.add(Node(name="out", kind="output", inputs=[out]))
        name_modules(g)
        return g

    def _standalone(self, name: str) -> Graph:
        """A layer compiled on its own: input features of width d_model (binding, else 512)."""
        d = self.bindings["d_model"].value if "d_model" in self.bindings else DEFAULT_D_MODEL
        g = Graph(name, {"causal": self._binding_bool("causal")})
        op = lookup_op("input", "features")
        try:
            params = op.params(d=d)
        except ValidationError:
            shown = "true" if d is True else "false" if d is False else d
            self.c.error("E204", f"invalid d_model {shown}", self.bindings["d_model"].span, help="a width >= 1")
            return None
        g.add(Node(name="x", kind="input", family="input", variant="features", params=params,
                   span=self.defs[name].span, meta={"arg_spans": {}}))
        out = self._emit(self.defs[name].expr, g, "x", wire=True)
        g.add(Node(name="out", kind="output", inputs=[out]))
        name_modules(g)
        return g

    def _init(self, e):
        """`init=gpt2` or `init=ds_init(alpha=0.5)`: the model's init scheme (evodsl/init.py), or None (reported)."""
        schemes = list(init_schemes.SCHEMES)
        name = e.id if isinstance(e, Name) else e.name if isinstance(e, Call) and not e.args else None
        if name not in init_schemes.SCHEMES:
            what = f"unknown init scheme '{name}'" if name else "init= takes a scheme, not this value"
            self.c.error("E204", what, e.span,
                         label=f"expected one of: {', '.join(schemes)}",
                         help=did_you_mean(name, schemes, listing=False) if name else
                         "write init=NAME or init=NAME(k=v), e.g. init=gpt2, init=ds_init(alpha=0.5)")
            return None
        call = Call(name, (), e.kwargs if isinstance(e, Call) else (), e.span, e.span)
        params, _ = self._params(_InitOp(name), call)
        return None if params is None else init_schemes.InitChoice(name, params)

    def _binding_bool(self, name: str) -> bool:
        b = self.bindings.get(name)
        if b is None:
            return False
        if not isinstance(b.value, bool):
            self.c.error("E204", f"'{name}' must be true or false", b.span)
            return False
        return b.value


class _InitOp:
    """An init scheme seen as an op by the parameter checks (values.py reads these four)."""

    def __init__(self, name: str):
        self.params, self.id = init_schemes.SCHEMES[name], f"init({name})"
        self.family, self.variant = "init", name


def _ref_name(e) -> str:
    return e.id if isinstance(e, Name) else e.name


def _layer_refs(e):
    """The names used as layers in an expression (op calls, definitions), inside residual/parallel/repeat too."""
    if isinstance(e, (Name, Call)):
        yield e
    elif isinstance(e, Pipe):
        for item in e.items:
            yield from _layer_refs(item)
    elif isinstance(e, (Residual, Repeat)):
        yield from _layer_refs(e.body)
    elif isinstance(e, Parallel):
        for branch in e.branches:
            yield from _layer_refs(branch)


def build(program: Program, overrides: dict | None = None) -> tuple[Graph | None, Collector]:
    """AST -> Graph. `overrides` replace the values of the spec's bindings of the same names."""
    b = Builder(program, overrides)
    try:
        graph = b.run()
    except RecursionError:  # definitions inlined into definitions, each within MAX_DEPTH, still too deep
        graph = None
        b.c.error("E104", "the spec nests too deeply to build (through its definitions)",
                  Span(program.file, 1, 1, 1, 1), help="flatten some definitions, or use repeat(...)")
    for name in b.overrides:  # not consumed: the spec has no such binding
        b.c.error("E220", f"--set {name}: the spec has no binding '{name}'",
                  help=did_you_mean(name, b.bindings) or "only existing bindings can be overridden")
    return graph, b.c
