"""Layers for the build pass: a pipeline of items -> nodes, with definitions inlined and the sublayer rule
(README, "How a pipeline is wired") applied; residual, parallel and repeat; each op call validated against its
params model. The statements, models and streams that use these are passes/build.py."""
from __future__ import annotations

from ..diagnostics import did_you_mean
from ..ir import Graph, Node
from ..ops.registry import FAMILIES, variants
from ..ops.registry import lookup as lookup_op
from ..syntax import Call, Name, Parallel, Pipe, Repeat, Residual
from .values import _ERR, Values

# residual(f, norm=W): the named wirings, each the written-out form it stands for (README, "Residual wiring"):
# W -> (a norm before f inside the residual, a norm after f): pre  = residual(norm -> f),
# post = residual(f) -> norm (after the add), sandwich = residual(norm -> f -> norm)
WIRINGS = {"none": (False, False), "pre": (True, False), "post": (False, True), "sandwich": (True, True)}

MAX_REPEAT = 10_000  # copies in one repeat(...): far past any real model, short of hanging the builder
MAX_NODES = 10_000  # graph nodes a definition or model may expand to, definitions inlined (a repeat's body
                    # counts once, whatever its count): the specs in specs/ have 15 to 18; past it, E221


class Layers(Values):
    """What the Builder needs here besides Values: `defs` (name -> Definition), `_expanding` (the definitions
    being inlined) and `_scores` (a stack of the mha nodes inside residual(..., scores=true))."""

    defs: dict
    _expanding: list
    _scores: list
    _sizes: dict
    _calls: dict
    _opaque: bool
    _in_scores: int

    def _size(self, e) -> int:
        """Nodes that `e` expands to, definitions inlined; each definition's size is computed once, so that
        a chain of definitions each using the previous one twice costs linear time here, not exponential."""
        if isinstance(e, Pipe):
            return sum(self._size(i) for i in e.items)
        if isinstance(e, Residual):
            return self._size(e.body) + 4  # the add, a scale op, and at most two norms (norm=sandwich)
        if isinstance(e, Parallel):
            return sum(self._size(b) for b in e.branches) + 1
        if isinstance(e, Repeat):
            return self._size(e.body) + 1
        name = e.id if isinstance(e, Name) else e.name if (isinstance(e, Call) and not e.args and not e.kwargs) else None
        if name in self.failed:
            return 1  # its own error is reported; its users are not refused again for it
        if name in self.defs and name not in self._sizes:
            self._sizes[name] = 0  # a recursive definition (reported elsewhere) stops here
            self._sizes[name] = self._size(self.defs[name].expr)
        return self._sizes.get(name, 2)  # an op call, and the add of its residual under the sublayer rule

    def _too_big(self, expr, what: str, span) -> bool:
        """E221 when `expr` would expand past MAX_NODES."""
        size = self._size(expr)
        if size > MAX_NODES:
            self.c.error("E221", f"{what} expands to {size:,} nodes, more than the limit of {MAX_NODES:,}", span,
                         help="definitions are inlined where they are used: for depth, use repeat(block, N), "
                              "whose body is built once")
            return True
        return False

    def _flatten(self, e) -> list:
        """Pipeline items with nested pipelines and definition names inlined."""
        if isinstance(e, Pipe):
            return [i for item in e.items for i in self._flatten(item)]
        name = e.id if isinstance(e, Name) else e.name if (isinstance(e, Call) and not e.args and not e.kwargs) else None
        if name in self.defs and name not in self.failed:
            if self._opaque and not self._in_scores:
                return [e]  # validated at its own statement; the caller's own items are what is checked
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
        if name in self.defs and self._opaque and not call.args and not call.kwargs:
            return x  # a definition left unexpanded while another is validated
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
        key = (call.span, call.name, len(self.bindings))  # bindings only grow: a later one may fill a parameter
        if key not in self._calls:  # each call is validated once, however often its definition is inlined
            self._calls[key] = self._validate_call(call, fam)
        variant, params, spans = self._calls[key]
        if params is None:
            return x
        streams = self._stream_inputs(lookup_op(name, variant), params, call)  # xattn(kv=src): src's value
        if streams is None:
            return x
        node = g.add(Node(name=g.fresh(), kind="call", family=name, variant=variant, params=params,
                          inputs=[x, *streams], span=call.span, meta={"arg_spans": spans}))
        if self._scores:
            self._scores[-1].append(node)
        return node.name

    def _validate_call(self, call: Call, fam) -> tuple:
        """(variant, params or None, argument spans), every problem reported."""
        variant = self._variant(call, fam)
        op = lookup_op(fam.name, variant) if variant else None
        if variant and op is None:
            span = call.args[0].span if call.args else call.name_span
            self.c.error("E202", f"unknown variant '{variant}' for op '{fam.name}'", span,
                         label=f"expected one of: {', '.join(variants(fam.name))}",
                         help=did_you_mean(variant, variants(fam.name), listing=False))
        params, spans = self._params(op, call) if op else (None, {})
        return variant, params, spans

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
        own = {"scale": ["none", *variants("residual")], "scores": bool, "norm": list(WIRINGS)}
        kw = self._kwargs([k for k in r.kwargs if k.name in own], own, "residual")
        rest = tuple(k for k in r.kwargs if k.name not in own)  # the scale op's parameters: scale=layerscale, init=0.1
        scores = kw.get("scores", (False,))[0]
        wiring, at = kw.get("norm", ("none", r.span))
        before, after = WIRINGS[wiring]
        ln = Call("norm", (), (), at, at)  # the family's default norm, as a bare `norm` written there
        body = Pipe((ln, r.body, ln) if after else (ln, r.body), r.span) if before else r.body  # post: after the add
        self._scores.append([])
        self._in_scores += bool(scores)
        try:
            h = self._emit(body, g, x, wire=False)
        finally:
            self._in_scores -= bool(scores)
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
        if scale[0] == "none":
            for k in rest:
                self.c.error("E203", f"unknown parameter '{k.name}' for residual", k.name_span,
                             help=did_you_mean(k.name, own, prefix="residual takes ")
                             + "; a scale op's parameters follow scale=V, e.g. residual(f, scale=layerscale, init=0.1)")
        else:
            op = lookup_op("residual", scale[0])
            params, spans = self._params(op, Call("residual", (), rest, r.span, r.span))
            if params is None:
                return x
            if op.inputs == 2:  # it reads the skip too and adds it itself (deepnorm: alpha x + f(x))
                y = g.add(Node(name=g.fresh(), kind="call", family="residual", variant=scale[0], params=params,
                               inputs=[h, x], span=r.span, meta={"arg_spans": spans})).name
                return self._emit_item(ln, g, y) if after and not before else y
            h = g.add(Node(name=g.fresh(), kind="call", family="residual", variant=scale[0], params=params,
                           inputs=[h], span=r.span, meta={"arg_spans": spans})).name
        y = g.add(Node(name=g.fresh(), kind="add", inputs=[x, h], span=r.span)).name
        return self._emit_item(ln, g, y) if after and not before else y

    def _emit_parallel(self, p: Parallel, g: Graph, x: str) -> str:
        kw = self._kwargs(p.kwargs, {"merge": variants("merge")}, "parallel")
        merge = kw.get("merge", ("sum",))[0]
        outs = [self._emit(b, g, x, wire=False) for b in p.branches]
        op = lookup_op("merge", merge)
        return g.add(Node(name=g.fresh(), kind="call", family="merge", variant=merge, params=op.params(),
                          inputs=outs, span=p.span, meta={"arg_spans": {}})).name

    def _emit_repeat(self, r: Repeat, g: Graph, x: str) -> str:
        kw = self._kwargs(r.kwargs, {"shared": bool, "reversible": bool}, "repeat")
        count = self._eval(r.count)
        if count is not _ERR and (isinstance(count, bool) or not isinstance(count, int)
                                  or not 1 <= count <= MAX_REPEAT):
            self.c.error("E204", f"repeat count must be a whole number from 1 to {MAX_REPEAT:,}, got {count}",
                         r.count.span, help="deeper stacks: nest repeats, e.g. repeat(repeat(block, 100), 200)")
            count = _ERR
        body = Graph("body")
        body.add(Node(name="x", kind="input"))
        if self._streams is not None:  # a model with streams: the body captures those it reads
            self._scopes.append((body, {}))
        try:
            out = self._emit(r.body, body, "x", wire=True)
            streams = self._body_streams(len(self._scopes) - 1) if self._streams is not None else []
        finally:
            if self._streams is not None:
                self._scopes.pop()
        body.add(Node(name="out", kind="output", inputs=[out]))
        name_modules(body)
        reversible = kw.get("reversible", (False,))[0]
        if reversible and not self._opaque:  # a definition validated alone leaves those it uses out
            why = reversible_sublayers(body)
            if isinstance(why, str):
                self.c.error("E313", "repeat(..., reversible=true) needs a body of residual sublayers in pairs",
                             r.body.span, label=why,
                             help="e.g. repeat(norm -> mha -> norm -> ffn, N, reversible=true): each pair (F, G) "
                                  "computes Y1 = X1 + F(X2), Y2 = X2 + G(Y1) (RevNet, Reformer)")
                return x
        if count is _ERR or streams is None:
            return x
        return g.add(Node(name=g.fresh(), kind="repeat", inputs=[x, *streams], body=body, count=count,
                          shared=kw.get("shared", (False,))[0], reversible=reversible, span=r.span)).name


def reversible_sublayers(body: Graph):
    """A reversible repeat's body as its residual sublayers, [(the op calls of F, the add X + F), ...], an even
    number of them (each pair (F, G) one reversible layer), each a chain of op calls reading only the previous
    sum (the body's input, for the first); else why not (a string)."""
    if len(body.inputs) != 1:
        return "its body reads another stream"
    if any(n.residual_scores for n in body.calls()):
        return "residual scores pass from layer to layer, which its backward's recomputation cannot replay"
    base, run, out = body.input.name, [], []
    for n in body.nodes[1:-1]:
        if n.kind == "add":
            if n.inputs[0] != base or not run:
                return "its body has an op outside its residual sublayers"
            out.append((run, n))
            base, run = n.name, []
            continue
        own = {base} | {m.name for m in run}
        if n.kind != "call" or not set(n.inputs) <= own:
            return "a sublayer holds a nested repeat, or reads another sublayer's values"
        run.append(n)
    if run or body.output.inputs[0] != base:
        return "its body ends with an op after its last residual sublayer"
    if len(out) % 2:
        return f"its body has {len(out)} residual sublayer{'s' if len(out) != 1 else ''}, an odd number"
    return out


def name_modules(g: Graph) -> None:
    """Name each call/repeat node's module after its family (attn, ffn, norm1, norm2, blocks, ...); in a model
    with streams, after its stream too (encoder_embed, decoder_blocks)."""
    def base(n: Node) -> str:
        name = "blocks" if n.kind == "repeat" else FAMILIES[n.family].module_name
        return f"{n.meta['stream']}_{name}" if g.streams and "stream" in n.meta else name

    owners = [n for n in g.nodes if n.kind in ("call", "repeat") or (n.kind == "input" and n.family)]
    totals: dict[str, int] = {}
    for n in owners:
        totals[base(n)] = totals.get(base(n), 0) + 1
    seen: dict[str, int] = {}
    for n in owners:
        b = base(n)
        seen[b] = seen.get(b, 0) + 1
        n.module = b if totals[b] == 1 else f"{b}{seen[b]}"
