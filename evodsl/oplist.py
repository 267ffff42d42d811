"""`evodsl ops`: every registered op with its parameters, as text, JSON or the README's markdown table."""
from __future__ import annotations

import json


def op_rows() -> list[dict]:
    """One dict per op (family order, then variant): id, causal claim, summary, paper, note, params, supports, decode."""
    from .ops import FAMILIES, REGISTRY, load_all

    load_all()
    rows = []
    for (family, variant), op in sorted(REGISTRY.items(), key=lambda kv: (list(FAMILIES).index(kv[0][0]), kv[0][1])):
        params = []
        for name, f in op.params.model_fields.items():
            params.append({"name": name, "type": _type_name(f.annotation),
                           "default": None if f.is_required() else f.default, "required": f.is_required(),
                           "description": f.description or ""})
        rows.append({"op": op.id, "family": family, "variant": variant, "causal": op.causal,
                     "summary": op.summary, "paper": op.paper, "note": op.note, "params": params,
                     "supports": sorted(op.supports),
                     "decode": (op.decode.__doc__.strip().splitlines()[0] if callable(op.decode) and op.decode.__doc__
                                else op.decode)})
    return rows


def render_text(rows: list[dict]) -> str:
    out = []
    for r in rows:
        out.append(f"{r['op']:<22} causal={r['causal']:<4} {r['summary']}")
        out.append(f"{'':<22} {r['paper']}")
        for p in r["params"]:
            default = "required" if p["required"] else f"default {json.dumps(p['default'])}"
            out.append(f"{'':<24}{p['name']}: {p['type']} ({default}) {p['description']}")
    return "\n".join(out)


def markdown_table(rows: list[dict]) -> str:
    """The README's op table (tests/test_readme.py checks the README holds exactly this)."""
    out = ["| op | parameters (default) | causal | equation | paper |", "|---|---|---|---|---|"]
    for r in rows:
        params = ", ".join(p["name"] + ("" if p["required"] else f"={json.dumps(p['default'])}")
                           for p in r["params"]) or "-"
        cells = [f"`{r['op']}`", params, r["causal"], r["summary"], r["paper"]]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out)


def _type_name(annotation) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("NoneType", "None")
