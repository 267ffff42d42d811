"""Build pass: AST -> Graph.

Resolves names, evaluates hyperparameter arithmetic, inlines definitions, applies the sublayer rule
(README, "How a pipeline is wired"), and validates every op call against its params model. Every problem
is collected; the caller raises them together.
"""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from ..diagnostics import Collector, Span, did_you_mean
from ..ir import Graph, Node
from ..ops.registry import FAMILIES, variants
from ..ops.registry import lookup as lookup_op
from ..syntax import Assign, Call, ModelDef, Name, Parallel, Pipe, Program, Repeat, Residual
from .values import _ERR, Binding, Values

MAX_REPEAT = 10_000  # copies in one repeat(...): far past any real model, short of hanging the builder
DEFAULT_D_MODEL = 512  # width of a layer compiled on its own when the spec binds no d_model


@dataclass
class Definition:
    expr: object
    span: Span


class Builder(Values):
    def __init__(self, program: Program, overrides: dict | None = None):
        self.program = program
        self.overrides = dict(overrides or {})  # binding name -> value that replaces the spec's
        self.c = Collector(program.source)
        self.bindings: dict[str, Binding] = {}
        self.failed: set[str] = set()  # bindings whose value had an error (already reported): no follow-on errors
        self.defs: dict[str, Definition] = {}
        self.models: list[ModelDef] = []
        self._expanding: list[str] = []
        self._scores: list[list] = []  # stack: mha nodes inside residual(..., scores=true)

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
                self._emit(st.value, self._scratch(), "x", wire=True)  # validate even if never used
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

        ref = next((r for r in _layer_refs(st.value) if uses(_ref_name(r))), None)
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

    def _flatten(self, e) -> list:
        """Pipeline items with nested pipelines and definition names inlined."""
        if isinstance(e, Pipe):
            return [i for item in e.items for i in self._flatten(item)]
        name = e.id if isinstance(e, Name) else e.name if (isinstance(e, Call) and not e.args and not e.kwargs) else None
        if name in self.defs:
            if name in self._expanding:
                return [e]  # reported in _emit_item
            self._expanding.append(name)
            try:
                return self._flatten(self.defs[name].expr)
            finally:
                self._expanding.pop()
        return [e]

    def _role(self, e) -> str | None:
        name = e.id if isinstance(e, Name) else e.name if isinstance(e, Call) else None
        fam = FAMILIES.get(name) if name not in self.defs else None
        return fam.role if fam else None

    def _emit(self, expr, g: Graph, x: str, wire: bool) -> str:
        return self._emit_items(self._flatten(expr), g, x, wire)

    def _emit_items(self, items: list, g: Graph, x: str, wire: bool) -> str:
        """Sublayer rule (when `wire`): each bare mha/ffn/mixer becomes x + f(x); a norm written right before
        a sublayer is its pre-norm, x + f(norm(x)), and is repeated (fresh weights) for every following
        sublayer of the same run. Anything else ends the run."""
        prenorm, i = None, 0
        while i < len(items):
            it = items[i]
            if wire and self._role(it) == "norm" and i + 1 < len(items) and self._role(items[i + 1]) == "sublayer":
                prenorm, it = it, items[i + 1]
                i += 1
            if wire and self._role(it) == "sublayer":
                h = self._emit_item(prenorm, g, x) if prenorm is not None else x
                h = self._emit_item(it, g, h)
                x = g.add(Node(name=g.fresh(), kind="add", inputs=[x, h], span=it.span)).name
            else:
                prenorm = None
                x = self._emit_item(it, g, x)
            i += 1
        return x

    def _emit_item(self, e, g: Graph, x: str) -> str:
        if isinstance(e, Name):
            e = Call(e.id, (), (), e.span, e.span)
        if isinstance(e, Call):
            return self._emit_call(e, g, x)
        if isinstance(e, Residual):
            return self._emit_residual(e, g, x)
        if isinstance(e, Parallel):
            return self._emit_parallel(e, g, x)
        if isinstance(e, Repeat):
            return self._emit_repeat(e, g, x)
        self.c.error("E214", "expected a layer here, not a number", e.span,
                     help="layers are ops such as norm, mha(...), ffn(...), or names defined as layers")
        return x

    def _emit_call(self, call: Call, g: Graph, x: str) -> str:
        name = call.name
        if name in self.failed:  # a rejected definition or binding: its error is already reported
            return x
        if name in self._expanding:
            self.c.error("E207", f"'{name}' is defined in terms of itself", call.name_span,
                         help="definitions cannot be recursive; use repeat(...) for depth")
            return x
        if name in self.defs:
            self.c.error("E215", f"'{name}' is a definition and takes no arguments", call.span,
                         help=f"write '{name}' alone")
            return x
        if name in self.bindings:
            self.c.error("E214", f"'{name}' is a number (line {self.bindings[name].span.line}), not a layer",
                         call.name_span)
            return x
        fam = FAMILIES.get(name)
        if fam is None:
            self.c.error("E201", f"unknown op '{name}'", call.name_span,
                         help=did_you_mean(name, [f for f, v in FAMILIES.items() if v.role != "internal"]
                                           + list(self.defs)))
            return x
        if fam.role == "internal":
            use = "residual(f, scale=V)" if name == "residual" else "parallel(a, b, merge=V)"
            self.c.error("E213", f"'{name}' is not called directly", call.name_span, help=f"write {use}")
            return x
        if fam.role == "input":
            self.c.error("E217", "input(...) can only start a model", call.span,
                         help="write `model NAME = input(tokens, vocab=V) -> ...`")
            return x
        variant = self._variant(call, fam)
        op = lookup_op(name, variant) if variant else None
        if variant and op is None:
            span = call.args[0].span if call.args else call.name_span
            self.c.error("E202", f"unknown variant '{variant}' for op '{name}'", span,
                         label=f"expected one of: {', '.join(variants(name))}",
                         help=did_you_mean(variant, variants(name), listing=False))
        params, spans = self._params(op, call) if op else (None, {})
        if params is None:
            return x
        node = g.add(Node(name=g.fresh(), kind="call", family=name, variant=variant, params=params, inputs=[x],
                          span=call.span, meta={"arg_spans": spans}))
        if self._scores:
            self._scores[-1].append(node)
        return node.name

    def _variant(self, call: Call, fam) -> str | None:
        for extra in call.args[1:]:
            self.c.error("E208", "an op call takes one positional argument, the variant", extra.span,
                         help="pass the others by name, e.g. mha(local, window=128)")
        if not call.args:
            if fam.default is None:
                self.c.error("E216", f"op '{fam.name}' needs a variant", call.span,
                             help=f"write {fam.name}(V) with V one of: {', '.join(variants(fam.name))}")
            return fam.default
        v = call.args[0]
        if not isinstance(v, Name):
            self.c.error("E208", "the variant is a name", v.span,
                         help=f"e.g. {fam.name}({(variants(fam.name) or ['name'])[0]})")
            return None
        return v.id

    def _emit_residual(self, r: Residual, g: Graph, x: str) -> str:
        kw = self._kwargs(r.kwargs, {"scale": ["none", *variants("residual")], "scores": bool}, "residual")
        scores = kw.get("scores", (False,))[0]
        self._scores.append([])
        h = self._emit(r.body, g, x, wire=False)
        carried = self._scores.pop()
        if scores:
            mhas = [n for n in carried if n.family == "mha"]
            if not mhas:
                self.c.error("E304", "residual(..., scores=true) has no attention inside", r.span,
                             help="RealFormer adds the previous layer's attention scores: put an mha inside")
            for n in mhas:
                if "residual_scores" not in n.op.supports:
                    self.c.error("E303", f"{n.op.id} has no attention scores to carry", n.span,
                                 help="residual attention scores (RealFormer) need mha(softmax)")
                n.residual_scores = True
        elif self._scores:
            self._scores[-1].extend(carried)
        scale = kw.get("scale", ("none",))
        if scale[0] != "none":
            op = lookup_op("residual", scale[0])
            h = g.add(Node(name=g.fresh(), kind="call", family="residual", variant=scale[0], params=op.params(),
                           inputs=[h], span=r.span, meta={"arg_spans": {}})).name
        return g.add(Node(name=g.fresh(), kind="add", inputs=[x, h], span=r.span)).name

    def _emit_parallel(self, p: Parallel, g: Graph, x: str) -> str:
        kw = self._kwargs(p.kwargs, {"merge": variants("merge")}, "parallel")
        merge = kw.get("merge", ("sum",))[0]
        outs = [self._emit(b, g, x, wire=False) for b in p.branches]
        op = lookup_op("merge", merge)
        return g.add(Node(name=g.fresh(), kind="call", family="merge", variant=merge, params=op.params(),
                          inputs=outs, span=p.span, meta={"arg_spans": {}})).name

    def _emit_repeat(self, r: Repeat, g: Graph, x: str) -> str:
        kw = self._kwargs(r.kwargs, {"shared": bool}, "repeat")
        count = self._eval(r.count)
        if count is not _ERR and (isinstance(count, bool) or not isinstance(count, int)
                                  or not 1 <= count <= MAX_REPEAT):
            self.c.error("E204", f"repeat count must be a whole number from 1 to {MAX_REPEAT:,}, got {count}",
                         r.count.span, help="deeper stacks: nest repeats, e.g. repeat(repeat(block, 100), 200)")
            count = _ERR
        body = Graph("body")
        body.add(Node(name="x", kind="input"))
        out = self._emit(r.body, body, "x", wire=True)
        body.add(Node(name="out", kind="output", inputs=[out]))
        name_modules(body)
        if count is _ERR:
            return x
        return g.add(Node(name=g.fresh(), kind="repeat", inputs=[x], body=body, count=count,
                          shared=kw.get("shared", (False,))[0], span=r.span)).name

    # ------------------------------------------------------------------ targets

    def _model(self, m: ModelDef) -> Graph | None:
        opts = {k: v for k, (v, _) in self._kwargs(m.options, {"causal": bool}, "model").items()}
        opts.setdefault("causal", self._binding_bool("causal"))
        g = Graph(m.name, opts)
        items = self._flatten(m.body)
        first = items[0]
        if not (isinstance(first, Call) and first.name == "input"):
            self.c.error("E217", "a model starts with its input", first.span,
                         help="write `model NAME = input(tokens, vocab=V) -> ...` or input(features, d=D)")
            return None
        variant = self._variant(first, FAMILIES["input"])
        op = lookup_op("input", variant) if variant else None
        if variant and op is None:
            self.c.error("E202", f"unknown variant '{variant}' for op 'input'", first.args[0].span,
                         help=did_you_mean(variant, variants("input")))
        params, spans = self._params(op, first) if op else (None, {})
        g.add(Node(name="x", kind="input", family="input", variant=variant, params=params, span=first.span,
                   meta={"arg_spans": spans}))
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

    def _binding_bool(self, name: str) -> bool:
        b = self.bindings.get(name)
        if b is None:
            return False
        if not isinstance(b.value, bool):
            self.c.error("E204", f"'{name}' must be true or false", b.span)
            return False
        return b.value


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


def name_modules(g: Graph) -> None:
    """Name each call/repeat node's module after its family (attn, ffn, norm1, norm2, blocks, ...)."""
    def base(n: Node) -> str:
        return "blocks" if n.kind == "repeat" else FAMILIES[n.family].module_name

    owners = [n for n in g.nodes if n.kind in ("call", "repeat") or (n.kind == "input" and n.family)]
    totals: dict[str, int] = {}
    for n in owners:
        totals[base(n)] = totals.get(base(n), 0) + 1
    seen: dict[str, int] = {}
    for n in owners:
        b = base(n)
        seen[b] = seen.get(b, 0) + 1
        n.module = b if totals[b] == 1 else f"{b}{seen[b]}"


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
