"""`evodsl diff A B`: what changed between two specs, as a structural diff of their graphs and a cost delta.

The structure is read from each graph IR (after parsing and validation, so names are inlined and the sublayer
rule applied): every op call and every repeat, in graph order, with its path in the built module
("blocks.*.attn") and its parameters (all of them, defaults included, so `mha` and `mha(softmax, heads=8)` with
heads = 8 compare equal). The two sequences are aligned by op (family and variant) within each repeat scope
(difflib), so inserting one norm does not make every later op look changed. An aligned pair whose parameters
differ is `changed`; a removed run facing an added run of the same length is paired position by position as
`replaced` (a variant swapped); the rest are `removed` / `added`. A repeat whose count or sharing changed is
`changed` with those fields.

The cost delta is `evodsl.cost` of both at the same length: parameters, FLOPs, activation memory, KV cache and
the complexity classes.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from .ir import Graph

COST_FIELDS = (  # (label, path in evodsl.cost's dict)
    ("params", ("params",)),
    ("forward FLOPs", ("flops", "forward")),
    ("train-step FLOPs", ("flops", "train_step")),
    ("activations (inference)", ("memory", "activations_inference")),
    ("activations (training)", ("memory", "activations_training")),
    ("KV cache", ("memory", "kv_cache")),
)


@dataclass
class Entry:
    """One op call or repeat of a graph: its module path, what it is, and its parameters."""

    path: str  # "blocks.*.attn"
    scope: str  # the repeat scope it is in: "blocks.*." ("" at the top)
    label: str  # "mha(softmax)", or "repeat"
    params: dict = field(default_factory=dict)
    given: frozenset = frozenset()  # the parameters not at their default (written in the spec or bound)

    @property
    def key(self) -> tuple:
        return self.scope, self.label


def _op_entry(path: str, scope: str, label: str, params, written: dict) -> Entry:
    values = params.model_dump() if params is not None else {}
    fields = type(params).model_fields if params is not None else {}
    given = frozenset(k for k, v in values.items() if k in written or fields[k].is_required() or fields[k].default != v)
    return Entry(path, scope, label, values, given)


def entries(graph: Graph, scope: str = "") -> list[Entry]:
    """Every call and repeat of `graph` in order, repeat bodies after their repeat (scope 'module.*.')."""
    out = []
    for n in graph.nodes:
        if n.kind == "call":
            out.append(_op_entry(f"{scope}{n.module or n.name}", scope, f"{n.family}({n.variant})", n.params,
                                 n.meta.get("arg_spans", {})))
        elif n.kind == "input" and n.variant:
            out.append(_op_entry(f"{scope}input", scope, f"input({n.variant})", n.params, {}))
        elif n.kind == "repeat":
            out.append(Entry(f"{scope}{n.module}", scope, "repeat",
                             {"count": n.count, "shared": n.shared,
                              **({"reversible": n.reversible} if getattr(n, "reversible", False) else {})}))
            out += entries(n.body, f"{scope}{n.module}.*.")
    return out


def _param_changes(a: Entry, b: Entry) -> dict:
    """{name: [old, new]} for every parameter whose value differs; one that only one op has (a variant swapped)
    counts where that side sets it away from its default (None stands for the side without it)."""
    keys = [k for k in a.params if k in b.params] + sorted(set(a.params) ^ set(b.params))
    return {k: [a.params.get(k), b.params.get(k)] for k in keys if a.params.get(k) != b.params.get(k)
            and (k in a.params and k in b.params or k in a.given or k in b.given)}


def structural_diff(a: Graph, b: Graph) -> list[dict]:
    """The changes from graph a to graph b: dicts with `change` (added, removed, changed, replaced), `path`
    (b's path for added, changed and replaced; a's for removed), `op` (and `was` for replaced) and `params`
    ({name: [old, new]} for changed and replaced; the op's parameters for added and removed)."""
    ea, eb = entries(a), entries(b)
    out = []
    matcher = difflib.SequenceMatcher(a=[e.key for e in ea], b=[e.key for e in eb], autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            for x, y in zip(ea[i1:i2], eb[j1:j2]):
                changes = _param_changes(x, y)
                if changes:
                    out.append({"change": "changed", "path": y.path, "op": y.label, "params": changes})
            continue
        if tag == "replace" and i2 - i1 == j2 - j1:
            for x, y in zip(ea[i1:i2], eb[j1:j2]):
                out.append({"change": "replaced", "path": y.path, "was": x.label, "op": y.label,
                            "params": _param_changes(x, y)})
            continue
        out += [{"change": "removed", "path": x.path, "op": x.label, "params": x.params} for x in ea[i1:i2]]
        out += [{"change": "added", "path": y.path, "op": y.label, "params": y.params} for y in eb[j1:j2]]
    return out


def _get(d: dict, path: tuple):
    for k in path:
        d = d[k]
    return d


def cost_delta(cost_a: dict, cost_b: dict) -> dict:
    """{label: {a, b, delta, ratio}} for the numbers of COST_FIELDS, and {a, b} for the complexity classes."""
    out = {}
    for label, path in COST_FIELDS:
        x, y = _get(cost_a, path), _get(cost_b, path)
        out[label] = {"a": x, "b": y, "delta": y - x, "ratio": (y / x) if x else None}
    for kind in ("time", "memory"):
        out[f"complexity ({kind})"] = {"a": cost_a["complexity"][kind], "b": cost_b["complexity"][kind]}
    return out


def diff(a, b, seq: int = 1024, batch: int = 1, dtype: str = "float32", overrides: dict | None = None) -> dict:
    """Specs a and b (text or path) -> {"a", "b", "seq", "batch", "dtype", "ops": structural_diff,
    "cost": cost_delta}."""
    import evodsl

    ga, gb = evodsl.parse(a, overrides), evodsl.parse(b, overrides)
    ca = evodsl.cost(a, seq=seq, batch=batch, dtype=dtype, overrides=overrides)
    cb = evodsl.cost(b, seq=seq, batch=batch, dtype=dtype, overrides=overrides)
    return {"a": str(ca["spec"]), "b": str(cb["spec"]), "seq": seq, "batch": batch, "dtype": dtype,
            "ops": structural_diff(ga, gb), "cost": cost_delta(ca, cb), "options": _options(ga, gb)}


def _options(ga, gb) -> dict:
    """The model options that differ (causal, init): name -> [a's, b's] as the spec writes them, "-" if unset."""
    keys = [*ga.options, *(k for k in gb.options if k not in ga.options)]
    return {k: [_value(ga.options.get(k)), _value(gb.options.get(k))] for k in keys
            if _value(ga.options.get(k)) != _value(gb.options.get(k))}


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "-" if v is None else str(v)


def _params(p: dict) -> str:
    return ", ".join(f"{k}={_value(v)}" for k, v in p.items())


def _human(x: int, label: str) -> str:
    if "FLOPs" in label:
        units = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
        return next((f"{x / s:.3g} {u}" for s, u in units if abs(x) >= s), str(x))
    if label == "params":
        return f"{x:,}"
    return f"{x / 2**20:,.1f} MiB"


def render(d: dict) -> str:
    """The diff as text: one line per structural change, then the cost table."""
    lines = [f"--- {d['a']}", f"+++ {d['b']}"]
    for k, (o, n) in d.get("options", {}).items():
        lines.append(f"~ model: {k} {o} -> {n}")
    if not d["ops"]:
        lines.append("  (the same ops and parameters)")
    for c in d["ops"]:
        if c["change"] == "changed":
            what = ", ".join(f"{k} {_value(o)} -> {_value(n)}" for k, (o, n) in c["params"].items())
            lines.append(f"~ {c['path']}: {c['op']}: {what}")
        elif c["change"] == "replaced":
            what = ", ".join(f"{k} {_value(o)} -> {_value(n)}" for k, (o, n) in c["params"].items())
            lines.append(f"~ {c['path']}: {c['was']} -> {c['op']}" + (f" ({what})" if what else ""))
        else:
            lines.append(f"{'+' if c['change'] == 'added' else '-'} {c['path']}: {c['op']}({_params(c['params'])})")
    lines.append(f"\ncost at seq {d['seq']}, batch {d['batch']}, {d['dtype']}:")
    width = max(len(k) for k in d["cost"])
    for label, v in d["cost"].items():
        if "delta" in v:
            ratio = "" if v["ratio"] is None else f"  ({v['ratio']:.3g}x)"
            sign = "+" if v["delta"] >= 0 else "-"
            lines.append(f"  {label:<{width}}  {_human(v['a'], label):>14} -> {_human(v['b'], label):>14}  "
                         f"{sign}{_human(abs(v['delta']), label)}{ratio}")
        else:
            same = "" if v["a"] != v["b"] else "  (same)"
            lines.append(f"  {label:<{width}}  {v['a']} -> {v['b']}{same}")
    return "\n".join(lines)
