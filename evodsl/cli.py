"""The `evodsl` command: check, compile, ops. Exit 0 on success, 1 on a spec error, 2 on a usage error."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .diagnostics import EvoError

EXIT_OK, EXIT_SPEC, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


def _cmd_check(args) -> int:
    import evodsl

    graph = evodsl.parse(Path(args.spec))
    print(graph)
    return EXIT_OK


def _fmt_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _cmd_compile(args) -> int:
    import evodsl

    if args.output is not None and not Path(args.output).parent.is_dir():
        print(f"evodsl compile: error: output folder does not exist: {Path(args.output).parent}", file=sys.stderr)
        return EXIT_USAGE
    device = "meta" if args.meta else None
    model = evodsl.compile(Path(args.spec), backend=args.backend, seed=args.seed, device=device)
    total = sum(p.numel() for p in model.parameters())
    print(f"{model.graph_name}: {type(model).__name__} from {args.spec} (backend {args.backend}, seed {args.seed})")
    width = max((len(name) for name, _ in model.named_children()), default=4)
    seen: set[int] = set()
    for name, child in model.named_children():
        own = [p for p in child.parameters() if id(p) not in seen]
        shared = sum(1 for p in child.parameters() if id(p) in seen)
        seen.update(id(p) for p in own)
        note = "  (+ shared weights counted above)" if shared else ""
        print(f"  {name:<{width}}  {type(child).__name__:<24} {sum(p.numel() for p in own):>15,d}{note}")
    print(f"parameters: {total:,d} ({_fmt_count(total)})")
    if args.output:
        if args.meta:
            print("evodsl compile: error: -o needs real weights; drop --meta", file=sys.stderr)
            return EXIT_USAGE
        evodsl.save(model, args.output)
        print(f"wrote {args.output} (load with evodsl.load({str(args.output)!r}))")
    return EXIT_OK


def _cmd_ops(args) -> int:
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
                     "supports": sorted(op.supports)})
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return EXIT_OK
    if args.markdown:
        print(markdown_table(rows))
        return EXIT_OK
    for r in rows:
        print(f"{r['op']:<22} causal={r['causal']:<4} {r['summary']}")
        print(f"{'':<22} {r['paper']}")
        for p in r["params"]:
            default = "required" if p["required"] else f"default {json.dumps(p['default'])}"
            print(f"{'':<24}{p['name']}: {p['type']} ({default}) {p['description']}")
    return EXIT_OK


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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evodsl", description="Declare, check and build Transformer variants.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    c = sub.add_parser("check", help="validate a spec and print its graph",
                       description="Validate SPEC and print its graph IR with inferred shapes.")
    c.add_argument("spec", metavar="SPEC", help="a .evo file")
    c.set_defaults(run=_cmd_check)
    b = sub.add_parser("compile", help="build a spec with a backend",
                       description="Build SPEC; print a module summary with the parameter count.")
    b.add_argument("spec", metavar="SPEC", help="a .evo file")
    b.add_argument("--backend", choices=["torch"], default="torch", help="target backend (default torch)")
    b.add_argument("-o", "--output", metavar="FILE", help="save an artifact (spec + weights); load with evodsl.load")
    b.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    b.add_argument("--meta", action="store_true", help="build on the meta device: no weights are allocated")
    b.set_defaults(run=_cmd_compile)
    o = sub.add_parser("ops", help="list the registered ops", description="List every op with its parameters.")
    fmt = o.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="machine-readable output")
    fmt.add_argument("--markdown", action="store_true", help="a markdown table (the README's op table)")
    o.set_defaults(run=_cmd_ops)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)  # usage errors exit 2 (argparse)
    try:
        return args.run(args)
    except EvoError as err:
        print(err.render(), file=sys.stderr)
        return EXIT_SPEC
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001 - a bug of ours: say so, without a traceback
        print(f"evodsl: internal error: {type(err).__name__}: {err}\n"
              f"  = help: this is a bug in evodsl; set EVODSL_TRACEBACK=1 to see where", file=sys.stderr)
        import os

        if os.environ.get("EVODSL_TRACEBACK"):
            raise
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
