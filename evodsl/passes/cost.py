"""Cost pass: parameters, FLOPs, activation memory, decoding state and complexity class, from the graph alone.

Each call node's op declares its `Cost` as formulas (evodsl/ops/cost.py); this pass adds them up through the
graph. Activation memory follows the backend's evaluation order: a value lives until its last use (inference
peak), and a value is kept for backward when an op that consumes it saves its input, or its producer saves its
output (training). No weights are allocated: only shapes are read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import sympy as sp

from ..ir import Graph, Node
from ..ops.cost import B, N, Cost, Symbols

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


def _num(expr, values: dict, b: int, n: int):
    if not isinstance(expr, sp.Basic):
        return expr
    v = expr.subs(values).subs({B: b, N: n})
    return int(v) if v.is_integer else float(v)


def _elems(shape) -> object:
    return prod((B if d == "b" else N if d == "n" else int(d)) for d in shape)


def _node_cost(node: Node, bytes_per: int) -> tuple[Cost, dict]:
    if node.kind == "add":
        e = _elems(node.meta["shape"])
        return Cost(fwd_other=e, bwd_other=0), {}
    env = node.meta["env"]
    s = Symbols(env.d if isinstance(env.d, int) else None, bytes_per)
    return node.op.cost(node.params, env, s), s.values


def collect(graph: Graph, bytes_per: int, prefix: str = "", count: int = 1) -> list[Row]:
    """Rows for every call/add node, repeat bodies folded (count multiplied, path 'blocks.*.')."""
    rows = []
    for n in graph.nodes:
        if n.kind in ("call", "add"):
            c, values = _node_cost(n, bytes_per)
            name = n.module if n.kind == "call" else f"+{n.name}"
            rows.append(Row(prefix + name, n.op.id if n.kind == "call" else "add", count, c, values,
                            _elems(n.meta["shape"]) * bytes_per, n))
        elif n.kind == "repeat":
            rows += collect(n.body, bytes_per, f"{prefix}{n.module}.*.", count * n.count)
    return rows


@dataclass
class Report:
    rows: list[Row]
    graph: Graph
    bytes_per: int

    def _by_node(self) -> dict:
        return {id(r.node): r for r in self.rows}

    # ---------------------------------------------------------------- symbolic totals

    def total(self, attr: str):
        """Sum of one Cost field over all executions (a formula in b, n, numbers substituted)."""
        return sp.expand(sum(sp.sympify(getattr(r.cost, attr)).subs(r.values) * r.count for r in self.rows))

    def params(self) -> int:
        total = 0
        for r in self.rows:  # a shared block's weights count once
            total += int(sp.sympify(r.cost.params).subs(r.values)) * (r.count if not _shared(self.graph, r) else 1)
        return total

    def symbolic(self, attr: str):
        """Sum of one field with the ops' own symbols kept (d, h, w, ...): for complexity classes."""
        return sp.expand(sum(sp.sympify(getattr(r.cost, attr)) for r in self.rows))

    # ---------------------------------------------------------------- memory at (b, n)

    def activations_training(self, b: int, n: int) -> int:
        """Bytes alive at the end of a grad-recording forward: everything kept for backward, plus the output."""
        return int(self._saved(self.graph, b, n, top=True))

    def _saved(self, g: Graph, b: int, n: int, top: bool) -> float:
        rows = self._by_node()
        consumers: dict[str, list[Node]] = {}
        for node in g.nodes:
            for i in node.inputs:
                consumers.setdefault(i, []).append(node)
        total = 0
        for node in g.nodes[1:-1]:
            out = _num(_elems(node.meta["shape"]) * self.bytes_per, {}, b, n)
            if node.kind == "repeat":  # values crossing between copies: saved if the body keeps its input
                total += node.count * self._saved(node.body, b, n, top=False)
                total += (node.count - 1) * self._body_saves_input(node.body) * out
                r = None
            else:
                r = rows[id(node)]
                total += r.num(r.cost.saved, b, n)
            users = consumers.get(node.name, [])
            kept = ((r is not None and r.cost.saves_output) or any(self._saves_input(c) for c in users)
                    or (top and any(c.kind == "output" for c in users)))
            if kept and not (r is not None and r.cost.inplace):
                total += out
        return total

    def _saves_input(self, node: Node) -> bool:
        if node.kind == "repeat":
            return self._body_saves_input(node.body)
        if node.kind in ("add", "output"):
            return False
        return self._by_node()[id(node)].cost.saves_input

    def _body_saves_input(self, g: Graph) -> bool:
        return any(self._saves_input(c) for c in g.nodes if g.input.name in c.inputs)

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
            if node.kind == "repeat":
                x = node.inputs[0]
                others = sum(v for name, v in live.items() if name != x)
                inner = self._peak(node.body, b, n, base + others, live[x])
                best = max(best, inner)
                out = _num(_elems(node.meta["shape"]) * self.bytes_per, {}, b, n)
            else:
                r = rows[id(node)]
                out = 0 if r.cost.inplace else r.num(r.out_bytes, b, n)
                best = max(best, base + sum(live.values()) + r.num(r.cost.peak, b, n) + out)
            for i in set(node.inputs):
                if last[i] == k:
                    live.pop(i, None)
            live[node.name] = out
        return best

    def kv_cache(self, b: int, n: int) -> int:
        return int(sum(r.num(r.cost.cache, b, n) * r.count for r in self.rows))


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


# -------------------------------------------------------------------- complexity classes


def _asymptotic(expr):
    """Replace what only caps growth (ceil, floor, min(n, w)) by its large-n value."""
    expr = expr.replace(sp.ceiling, lambda a: a).replace(sp.floor, lambda a: a)
    expr = expr.replace(lambda e: isinstance(e, sp.Min) and e.has(N),
                        lambda e: sp.Min(*[a for a in e.args if not a.has(N)]) if len(e.args) > 1 else e)
    expr = expr.replace(lambda e: isinstance(e, sp.Max) and e.has(N),
                        lambda e: sp.Max(*[a for a in e.args if a.has(N)]))
    return sp.expand(expr)


def complexity(expr) -> str:
    """'O(n^2 d)'-style class of a formula in n: its leading terms, coefficients and dominated terms dropped."""
    expr = _asymptotic(sp.sympify(expr).subs(B, 1))
    if expr == 0:
        return "O(1)"
    terms = []
    for t in sp.Add.make_args(expr):
        _, factors = t.as_coeff_Mul()
        powers = factors.as_powers_dict()
        deg = powers.get(N, 0)
        logs = sum(p for base, p in powers.items() if isinstance(base, sp.log) and base.has(N))
        syms = frozenset((str(k), v) for k, v in powers.items() if k != N and not isinstance(k, sp.log)
                         and not k.is_number)
        terms.append(((deg, logs), syms, factors))
    top = max(t[0] for t in terms)
    lead = {t[1]: t[2] for t in terms if t[0] == top}
    kept = [s for s in lead if not any(s < o for o in lead)]  # n*d dominates n
    parts = []
    for syms in sorted(kept, key=lambda s: sorted(s)):
        deg, logs = top
        bits = [("n" if deg == 1 else f"n^{deg}")] if deg else []
        bits += [name if p == 1 else f"{name}^{p}" for name, p in sorted(syms)]
        bits += (["log n"] if logs else [])
        parts.append(" ".join(bits) or "1")
    return "O(" + " + ".join(parts) + ")"
