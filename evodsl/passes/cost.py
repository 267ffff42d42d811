"""Cost pass: parameters, FLOPs, activation memory, decoding state and complexity class, from the graph alone.

Each call node's op declares its `Cost` as formulas (evodsl/ops/cost.py); this pass adds them up through the
graph. Activation memory follows the backend's evaluation order: a value lives until its last use (inference
peak), and a value is kept for backward when an op that consumes it saves its input, or its producer saves its
output (training). No weights are allocated: only shapes are read.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from math import prod

import sympy as sp

from ..ir import Graph, Node
from ..ops.cost import B, M, N, Cost, Symbols, cost_field, length
from .layers import reversible_sublayers

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Row:
    """One node's cost, folded over `count` executions (a repeated block's node appears once)."""

    path: str  # "blocks.*.attn"
    op: str  # "mha(softmax)", "add"
    count: int
    cost: Cost
    values: dict  # symbol -> number, for this row's formulas
    out_bytes: object  # bytes of the node's output tensor, a formula in b, n
    node: Node = field(repr=False, default=None)

    def num(self, expr, b: int, n: int):
        return _num(expr, self.values, b, n)


def _num(expr, values: dict, b: int, n):
    """`expr` at batch b and length n: an int, or (n, m) for a model with two inputs (m: the second's length)."""
    if not isinstance(expr, sp.Basic):
        return expr
    n, m = n if isinstance(n, tuple) else (n, n)
    # every symbol at once (xreplace): substituting the sizes first and b, n after would have sympy simplify the
    # Max / Min / Piecewise terms over symbolic n on the way, seconds per formula
    at = {k: sp.sympify(x) for k, x in {**values, B: b, N: n, M: m}.items()}
    v = expr.xreplace(at)
    while v.free_symbols & at.keys():  # a value that is itself a formula (a length such as n + 16)
        v = v.xreplace(at)
    if v.free_symbols:
        v = v.subs(at)
    return int(v) if v.is_integer else float(v)


def _sizes(expr, values: dict):
    """`expr` with the op's sizes (not b, n, m) put in, all at once (xreplace): subs would have sympy simplify
    its Max / Min terms over symbolic n after each one."""
    expr = sp.sympify(expr)
    at = {k: sp.sympify(v) for k, v in values.items()}
    out = expr.xreplace(at)
    return out.subs(at) if out.free_symbols & at.keys() else out


def _elems(shape) -> object:
    return prod((B if d == "b" else length(d)) for d in shape)


def _node_cost(node: Node, bytes_per: int) -> tuple[Cost, dict]:
    if node.kind == "add":
        e = _elems(node.meta["shape"])
        return Cost(fwd_other=e, bwd_other=0), {}
    env = node.meta["env"]
    s = Symbols(env.d if isinstance(env.d, int) else None, bytes_per, env.shape[1] if len(env.shape) > 1 else "n")
    return node.op.cost(node.params, env, s), s.values


def _recomputed(c: Cost, add: bool) -> Cost:
    """A node of a reversible repeat's body: its backward first recomputes its forward (an add: X = Y - F,
    and the sum of the two gradients of Y), and nothing of the body is kept for it."""
    return replace(c, bwd=c.bwd + c.fwd, bwd_other=c.bwd_other + (2 * c.fwd_other if add else c.fwd_other))


def collect(graph: Graph, bytes_per: int, prefix: str = "", count: int = 1, reversible: bool = False) -> list[Row]:
    """Rows for every call/add node, repeat bodies folded (count multiplied, path 'blocks.*.')."""
    rows = []
    for n in graph.nodes:
        if n.kind in ("call", "add"):
            c, values = _node_cost(n, bytes_per)
            c = _recomputed(c, n.kind == "add") if reversible else c
            name = n.module if n.kind == "call" else f"+{n.name}"
            rows.append(Row(prefix + name, n.op.id if n.kind == "call" else "add", count, c, values,
                            _elems(n.meta["shape"]) * bytes_per, n))
        elif n.kind == "repeat":
            rows += collect(n.body, bytes_per, f"{prefix}{n.module}.*.", count * n.count, reversible or n.reversible)
    return rows


@dataclass
class Report:
    rows: list[Row]
    graph: Graph
    bytes_per: int
    decoder_seq: int | None = None  # a model with two inputs: the second's length m (None: m = n)

    def lengths(self, n: int):
        """What the formulas take for a sequence length n: n, or (n, m) for a model with two inputs."""
        return (n, self.decoder_seq or n) if len(self.graph.inputs) > 1 else n

    def __post_init__(self):
        self._rows_by_node = {id(r.node): r for r in self.rows}
        self._kept_cache: dict = {}

    def _by_node(self) -> dict:
        return self._rows_by_node

    # ---------------------------------------------------------------- symbolic totals

    def total(self, attr: str):
        """Sum of one Cost field over all executions (a formula in b, n, numbers substituted); the decoding state
        ("cache") over the layers that keep one (not an encoder's)."""
        rows = self.decoding_rows() if attr == "cache" else self.rows
        return sp.expand(sum(_sizes(cost_field(r.cost, attr), r.values) * r.count for r in rows))

    def decoding_rows(self) -> list:
        """The rows that keep state: none in a model whose output is bidirectional (it does not decode); all, but
        an encoder's (it runs once, at the prompt); in a model that carries
        state from one segment to the next (memory(rmt), memory(xl)), the ops that carry it (the others keep
        nothing between segments)."""
        carried = [r for r in self.rows if r.node.kind == "call" and (r.node.op.carried or r.node.meta["env"].memory)]
        if carried:
            return carried
        g = self.graph
        if not (g.streams[-1].causal if g.streams else g.options.get("causal")):
            return []  # a bidirectional output: every position reads the whole sequence, nothing is decoded
        static = self.graph.static_streams()
        return [r for r in self.rows if r.node.meta.get("stream") not in static]

    def params(self) -> int:
        total = 0
        for r in self.rows:  # a shared block's weights count once
            total += int(sp.sympify(r.cost.params).subs(r.values)) * (r.count if not _shared(self.graph, r) else 1)
        return total

    # ---------------------------------------------------------------- memory at (b, n)

    def activations_training(self, b: int, n: int) -> int:
        """Bytes alive at the end of a grad-recording forward: everything kept for backward, plus the output."""
        return int(self._saved(self.graph, b, n, top=True))

    def _kept(self, g: Graph, top: bool) -> dict[str, bool]:
        """Which values of `g` are alive at the end of the forward: an op that uses one saves its input, its
        producer saves its output, it is the model's output, or an in-place op passes it on to a kept value."""
        key = (id(g), top)
        if key in self._kept_cache:
            return self._kept_cache[key]
        rows = self._by_node()
        users: dict[str, list[Node]] = {}
        for node in g.nodes:
            for i in node.inputs:
                users.setdefault(i, []).append(node)
        kept: dict[str, bool] = {}
        for node in reversed(g.nodes[:-1]):
            us = users.get(node.name, [])
            k = any(self._saves_input(u, node.name) for u in us) or (top and any(u.kind == "output" for u in us))
            k = k or any(u.kind == "call" and not rows[id(u)].cost.new_output_in_training and kept.get(u.name)
                         for u in us)
            if node.kind == "call":
                k = k or rows[id(node)].cost.saves_output
            kept[node.name] = k
        self._kept_cache[key] = kept
        return kept

    def _saved(self, g: Graph, b: int, n: int, top: bool) -> float:
        return sum(kept for kept, _ in self._steps(g, b, n, top))

    def activations_training_checkpointed(self, b: int, n: int) -> int:
        """activations_training with every repeat copy checkpointed (compile(checkpoint=True)): each copy keeps
        only its input (the block boundaries); the ops outside the repeats keep what they keep."""
        return int(sum(kept for kept, _ in self._steps(self.graph, b, n, top=True, checkpoint={})))

    def activations_training_checkpointed_peak(self, b: int, n: int) -> int:
        """activations_training_peak with every repeat copy checkpointed: going backward, a copy's backward
        first runs its forward again, so the boundaries before it and the copy's own saved tensors are alive
        beside its ops' backward working sets (one block's activations, not every block's)."""
        bodies: dict = {}
        steps = self._steps(self.graph, b, n, top=True, checkpoint=bodies)
        output = _num(_elems(self.graph.nodes[-1].meta["shape"]) * self.bytes_per, {}, b, n)
        total, prefix, best = sum(k for k, _ in steps), 0.0, 0.0
        for i, (kept, transient) in enumerate(steps):
            prefix += kept
            held = output if i < len(steps) - 1 else 0.0
            best = max(best, prefix + transient + held)
            inner = 0.0  # the copy recomputed: its steps, from the boundary it keeps (its input, counted above)
            for body_kept, body_transient in bodies.get(i, ()):
                inner += body_kept
                best = max(best, prefix + inner + body_transient + held)
        return int(max(best, total))

    def _steps(self, g: Graph, b: int, n: int, top: bool, checkpoint: dict | None = None) -> list[tuple[float, float]]:
        """Per executed op, in forward order (repeats unrolled): (bytes it leaves alive for backward, bytes its
        backward needs beyond that: its saved internals and the gradients of its input and output).
        checkpoint (a dict, not None): the top-level repeats' copies keep their input instead; it gets each
        copy's step index -> the steps of its body (what its recomputation and backward hold)."""
        rows = self._by_node()
        kept = self._kept(g, top)
        steps: list[tuple[float, float]] = []
        for node in g.nodes[1:-1]:
            if node.kind == "input":  # a second input, or a stream a repeat body reads: not the body's to keep
                continue
            out = _num(_elems(node.meta["shape"]) * self.bytes_per, {}, b, n)
            new = True
            if node.kind == "repeat" and node.reversible:  # only its output is kept (torch_reversible.py)
                steps.append((out, self._reversible_bwd(node, b, n, out)))
                continue
            if node.kind == "repeat" and checkpoint is not None:  # each copy's input, held for its recomputation
                first = 0.0 if kept[node.inputs[0]] else out  # the repeat's input, unless kept already
                body = self._steps(node.body, b, n, top=False)
                for i in range(node.count):
                    checkpoint[len(steps)] = body
                    steps.append((first if i == 0 else out, 0.0))
                steps.append((out if kept[node.name] else 0.0, 0.0))
                continue
            if node.kind == "repeat":  # values crossing between copies: kept if the body keeps its input
                body = self._steps(node.body, b, n, top=False)
                crossing = self._body_saves_input(node.body) * out
                for i in range(node.count):
                    steps += body + ([(crossing, 0.0)] if i < node.count - 1 else [])
                steps.append((out if kept[node.name] else 0.0, 0.0))
                continue
            saved, transient = 0.0, 0.0
            if node.kind == "call":
                r = rows[id(node)]
                saved = r.num(r.cost.saved, b, n)
                new = r.cost.new_output_in_training
                if new:  # its backward: the incoming gradient (none for the model's output: seeded stride-0)
                    # plus what the op's backward creates (default: its input's gradient)
                    ins = sum(_num(_elems(g.node(i).meta["shape"]) * self.bytes_per, {}, b, n)
                              for i in node.inputs if len(g.node(i).meta["shape"]) > 2)
                    created = ins if r.cost.bwd_peak is None else r.num(r.cost.bwd_peak, b, n)
                    final = top and node is g.nodes[-2]
                    transient = created + (0.0 if final else out)
                    # its output, kept for the ops after it that save their input, is released by their
                    # backward before this one runs (unless it keeps its output itself, or it is the model's)
                    if kept[node.name] and not r.cost.saves_output and not final:
                        transient -= out
                elif r.cost.bwd_peak is not None:  # a view whose backward still makes its input's gradient
                    transient = r.num(r.cost.bwd_peak, b, n)
            steps.append((saved + (out if kept[node.name] and new else 0.0), transient))
        return steps

    def _reversible_bwd(self, node: Node, b: int, n: int, out: float) -> float:
        """A reversible repeat's backward, one sublayer at a time: the incoming gradient (its output's) and one
        value rebuilt, the sublayer recomputed (what it keeps, its own backward's working set), and the
        gradients of the stack's parameters, which the autograd Function returns whether or not its caller
        asks for them (a training step makes them all the same): while the first copy's sublayer j is
        recomputed, those of every sublayer but the first copy's before j."""
        subs = reversible_sublayers(node.body)
        steps, rows = self._steps(node.body, b, n, top=False), self._by_node()
        at = [node.body.nodes[1:-1].index(add) for _, add in subs]  # each sublayer's add: where its steps end
        spans = [steps[(at[k - 1] + 1 if k else 0):at[k]] for k in range(len(subs))]

        def work(part):
            return sum(kk for kk, _ in part) + max((t for _, t in part), default=0.0)

        def grads(nodes):
            return sum(int(sp.sympify(rows[id(x)].cost.params).subs(rows[id(x)].values)) for x in nodes) \
                * self.bytes_per
        each = [grads(calls) for calls, _ in subs]
        total = (1 if node.shared else node.count) * sum(each)
        # the first copy's sublayer j is recomputed after every later one (their gradients made, and its own)
        return 1.5 * out + max(total - sum(each[:j]) + work(spans[j]) for j in range(len(subs)))

    def activations_training_peak(self, b: int, n: int) -> int:
        """Peak bytes over a training forward + backward through the activations: going backward, what the ops
        before k still keep, plus op k's backward working set."""
        steps = self._steps(self.graph, b, n, top=True)
        # the model's output (kept by the last step) stays alive through the whole backward: its caller holds
        # it (as a loss does), so the ops before the last one see it beside what they keep
        output = _num(_elems(self.graph.nodes[-1].meta["shape"]) * self.bytes_per, {}, b, n)
        total, prefix, best = sum(k for k, _ in steps), 0.0, 0.0
        for i, (kept, transient) in enumerate(steps):
            prefix += kept
            best = max(best, prefix + transient + (output if i < len(steps) - 1 else 0.0))
        return int(max(best, total))

    def _saves_input(self, node: Node, value: str | None = None) -> bool:
        """Whether `node` keeps its input `value` (default: its first) for backward."""
        if node.kind == "repeat" and node.reversible:  # rebuilt from its output in backward
            return False
        if node.kind == "repeat":  # its k-th input is its body's k-th input node
            k = node.inputs.index(value) if value in node.inputs else 0
            return self._kept(node.body, top=False)[node.body.inputs[k].name]
        if node.kind in ("add", "output"):
            return False
        return self._by_node()[id(node)].cost.saves_input

    def _body_saves_input(self, g: Graph) -> bool:
        return self._kept(g, top=False)[g.input.name]

    def activations_inference(self, b: int, n: int) -> int:
        """Peak bytes of activations during a no-grad forward (the output included, the input not)."""
        return int(self._peak(self.graph, b, n, base=0, in_bytes=0))

    def _peak(self, g: Graph, b: int, n: int, base: float, in_bytes: float) -> float:
        rows = self._by_node()
        last = {}
        for k, node in enumerate(g.nodes):
            for i in node.inputs:
                last[i] = k
        live = {g.input.name: in_bytes}
        best = base + in_bytes
        for k, node in enumerate(g.nodes[1:-1], start=1):
            if node.kind == "input":  # a second input (the caller's), or a stream a body reads (pinned outside)
                continue
            dying = [i for i in dict.fromkeys(node.inputs) if last[i] == k]
            if node.kind == "repeat" and node.reversible:
                # the first copy reads x as both X1 and X2; a later one holds X1 (X2 after its first sublayer)
                # beside its body; at the end Y1, Y2 and their concatenation
                out = _num(_elems(node.meta["shape"]) * self.bytes_per, {}, b, n)
                rest = base + sum(v for i, v in live.items() if i not in dying)
                best = max(best, self._peak(node.body, b, n, base + sum(live.values()), 0), rest + 2 * out)
                if node.count > 1:
                    best = max(best, self._peak(node.body, b, n, rest + out / 2, out / 2))
            elif node.kind == "repeat":
                # the block's input stays referenced while each copy runs (as in any eager loop), so it is
                # pinned: counted in the base, never freed inside the body
                best = max(best, self._peak(node.body, b, n, base + sum(live.values()), 0))
                out = _num(_elems(node.meta["shape"]) * self.bytes_per, {}, b, n)
            else:
                r = rows[id(node)] if node.kind == "call" else None
                inplace = r is not None and r.cost.inplace
                new = 0 if inplace else (r.num(r.out_bytes, b, n) if r else
                                         _num(_elems(node.meta["shape"]) * self.bytes_per, {}, b, n))
                best = max(best, base + sum(live.values()) + (r.num(r.cost.peak, b, n) if r else 0) + new)
                # an in-place output is its input's storage: it inherits the bytes when the input dies here
                out = live.get(node.inputs[0], 0) if inplace and node.inputs[0] in dying else new
            for i in dying:
                freed = live.pop(i, None)
                if g.node(i).meta.get("reused"):  # mha(skip_reuse) reads it later (passes/reuse.py): held until then
                    live[("held", g.node(i).meta.get("stream"))] = freed
            if node.kind == "call" and node.variant == "skip_reuse" and node.family == "mha":
                live.pop(("held", node.meta.get("stream")), None)
            live[node.name] = out
        return best

    def kv_cache(self, b: int, n: int) -> int:
        """Decoding state after n tokens (an encoder's layers keep none: it runs once, at the prompt)."""
        return int(sum(r.num(r.cost.cache, b, n) * r.count for r in self.decoding_rows()))


def _shared(graph: Graph, row: Row) -> bool:
    """True if the row's node sits in a shared repeat body (its weights are counted once)."""
    def walk(g: Graph, shared: bool):
        for n in g.nodes:
            if n is row.node:
                return shared
            if n.kind == "repeat":
                found = walk(n.body, shared or n.shared)
                if found is not None:
                    return found
        return None

    return bool(walk(graph, False))
