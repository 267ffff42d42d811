"""Complexity classes: the leading terms of a cost formula in the sequence lengths (n, a second input's m, a
segment memory's M), as 'O(n^2 d)', for `evodsl cost`'s table and `evodsl ops`. A formula's caps on growth (ceil,
floor, min(n, w), pieces by n) are replaced by their large-n values first."""
from __future__ import annotations

import sympy as sp

from ..ops.cost import MEM, B, M, N


def _asymptotic(expr):
    """Replace what only caps growth (ceil, floor, min(n, w)) by its large-n value."""
    expr = expr.replace(sp.ceiling, lambda a: a).replace(sp.floor, lambda a: a)
    # a cost in pieces by n (mha(nystrom): exact attention up to m positions) grows as its last, large-n piece
    expr = expr.replace(lambda e: isinstance(e, sp.Piecewise), lambda e: e.args[-1].expr)
    expr = expr.replace(lambda e: isinstance(e, sp.Min) and e.has(N),
                        lambda e: sp.Min(*[a for a in e.args if not a.has(N)]) if len(e.args) > 1 else e)
    expr = expr.replace(lambda e: isinstance(e, sp.Max) and e.has(N),
                        lambda e: sp.Max(*[a for a in e.args if a.has(N)]))
    # a numeric floor or cap on a size (max(32, w - 1): a block is at least 32) does not change the class
    expr = expr.replace(lambda e: isinstance(e, (sp.Max, sp.Min)) and any(a.is_number for a in e.args)
                        and not all(a.is_number for a in e.args),
                        lambda e: type(e)(*[a for a in e.args if not a.is_number]))
    return sp.expand(sp.cancel(expr))  # ceil(n / w) * w -> n once the ceiling is gone


def _dominated(a: tuple, b: tuple) -> bool:
    """Monomial a grows no faster than b in every symbol, and they differ."""
    da, db = dict(a), dict(b)
    return da != db and all(db.get(k, 0) >= da.get(k, 0) for k in da.keys() | db.keys())


def complexity(parts) -> str:
    """'O(n^2 d)'-style class of a cost in n (and m, a second input's length; M, a segment memory's): its leading terms, with
    coefficients dropped, and terms of the same order under 5% of the largest (at the spec's sizes, n = m = 1)
    left out. The order of a term is its degree in n and m together (n m and m^2 are as n^2), then its logs.

    `parts` is a formula, or a list of (formula, {symbol: value}) pairs whose costs add up."""
    if not isinstance(parts, list):
        parts = [(parts, {})]
    weight: dict = {}  # (order, monomial) -> size at the spec's values
    for expr, values in parts:
        expr = _asymptotic(sp.sympify(expr).subs(B, 1))
        for t in sp.Add.make_args(expr):
            if t == 0:
                continue
            coeff, factors = t.as_coeff_Mul()
            powers = factors.as_powers_dict()
            deg = powers.get(N, 0) + powers.get(M, 0) + powers.get(MEM, 0)
            logs = sum(p for base, p in powers.items() if isinstance(base, sp.log) and base.has(N, M, MEM))
            syms = tuple(sorted((str(k), v) for k, v in powers.items()
                                if not isinstance(k, sp.log) and not k.is_number))
            size = sp.sympify(t).subs({N: 1, M: 1, MEM: 1}).subs(values)
            size = abs(float(size)) if size.is_number else 1.0
            key = ((deg, logs), syms)
            weight[key] = weight.get(key, 0.0) + size
    if not weight:
        return "O(1)"
    top = max(order for order, _ in weight)
    lead = {syms: w for (order, syms), w in weight.items() if order == top}
    biggest = max(lead.values())
    kept = [syms for syms, w in lead.items() if w >= 0.05 * biggest or not biggest]
    kept = [s for s in kept if not any(_dominated(s, o) for o in kept)]  # n*d dominates n, d^2 dominates d
    _, logs = top
    parts_out = []
    lengths = {"M": 2, "m": 1, "n": 0}  # printed first, n before m before M
    for syms in sorted(kept, key=lambda s: ([lengths.get(k, 3) for k, p in s if k in lengths and p > 0], s)):
        ordered = sorted(syms, key=lambda kv: (lengths.get(kv[0], 3), kv[0]))
        bits = [name if p == 1 else f"{name}^{p}" for name, p in ordered if p > 0]
        bits += (["log n"] if logs else [])
        below = [name if p == -1 else f"{name}^{-p}" for name, p in ordered if p < 0]
        parts_out.append((" ".join(bits) or "1") + ("/" + " ".join(below) if below else ""))
    return "O(" + " + ".join(parts_out) + ")"
