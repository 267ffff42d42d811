"""The `evodsl` commands that work on spec text and the op list: graph, fmt, diff, ops (evodsl/cli.py holds the rest
and the entry point)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .cli import EXIT_OK, EXIT_SPEC, EXIT_USAGE, _add_set, _positive, _write_atomic
from .diagnostics import Diagnostic, EvoError


def _cmd_fmt(args) -> int:
    import difflib

    from .fmt import format_source

    if args.specs == ["-"]:
        text = sys.stdin.read()
        formatted = format_source(text, "<stdin>")
        sys.stdout.write(formatted)
        return EXIT_SPEC if args.check and formatted != text else EXIT_OK
    changed = []
    for spec in args.specs:
        path = Path(spec)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise EvoError([Diagnostic("E401", f"cannot read spec '{spec}': {err.strerror or err}",
                                       help="pass a path to a .evo file")]) from None
        formatted = format_source(text, spec)
        if formatted == text:
            continue
        changed.append(spec)
        if args.check:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), formatted.splitlines(True),
                                                       spec, f"{spec} (formatted)"))
        else:
            _write_atomic(spec, lambda tmp: Path(tmp).write_text(formatted, encoding="utf-8"))
            print(f"formatted {spec}")
    if args.check and changed:
        print(f"{len(changed)} of {len(args.specs)} file(s) not formatted: evodsl fmt {' '.join(changed)}",
              file=sys.stderr)
        return EXIT_SPEC
    return EXIT_OK


def _cmd_graph(args) -> int:
    import evodsl

    from .diagram import to_dot, to_png, to_svg

    out = Path(args.output)
    kind = out.suffix.lower().lstrip(".")
    if kind not in ("svg", "png", "dot"):
        print(f"evodsl graph: error: -o must end in .svg, .png or .dot (got '{out.name}')", file=sys.stderr)
        return EXIT_USAGE
    if not out.parent.is_dir():
        print(f"evodsl graph: error: output folder does not exist: {out.parent}", file=sys.stderr)
        return EXIT_USAGE
    graph = evodsl.parse(Path(args.spec), dict(args.set))
    if kind == "png":
        _write_atomic(args.output, lambda tmp: to_png(graph, tmp, args.expand))
    else:
        text = (to_svg if kind == "svg" else to_dot)(graph, args.expand)
        _write_atomic(args.output, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    print(f"wrote {args.output}")
    return EXIT_OK


def _cmd_diff(args) -> int:
    from .diff import diff, render

    d = diff(Path(args.a), Path(args.b), seq=args.seq, batch=args.batch, dtype=args.dtype, overrides=dict(args.set))
    print(json.dumps(d, indent=2, default=str) if args.json else render(d))
    return EXIT_OK


def _cmd_ops(args) -> int:
    from .oplist import markdown_table, op_rows, render_text

    rows = op_rows()
    print(json.dumps(rows, indent=2, default=str) if args.json else markdown_table(rows) if args.markdown
          else render_text(rows))
    return EXIT_OK


def add_tool_commands(sub) -> None:
    gr = sub.add_parser("graph", help="draw the model: SVG, PNG or DOT",
                        description="Draw SPEC from its graph IR: each op with its variant, arguments and parameters, "
                                    "residual adds with their skips, parallel branches, repeats framed with their "
                                    "count (drawn once; every copy with --expand), streams side by side, shapes on "
                                    "the edges where they change. SVG needs nothing; PNG needs matplotlib "
                                    "(evodsl[plot]); DOT is Graphviz text.")
    gr.add_argument("spec", metavar="SPEC", help="a .evo file")
    gr.add_argument("-o", "--output", metavar="FILE", required=True, help="arch.svg, arch.png or arch.dot")
    gr.add_argument("--expand", action="store_true", help="draw every copy of a repeat (not shared ones)")
    _add_set(gr)
    gr.set_defaults(run=_cmd_graph)
    fm = sub.add_parser("fmt", help="rewrite specs in the canonical layout (comments kept)",
                        description="Rewrite each SPEC in the canonical layout: spacing, aligned '=' in runs of "
                                    "one-line assignments, pipelines continued on '-> ' lines, lines over 120 "
                                    "characters broken; the author's line breaks and every comment are kept. "
                                    "SPEC '-' reads standard input and prints the result.")
    fm.add_argument("specs", metavar="SPEC", nargs="+", help=".evo files (or - for standard input)")
    fm.add_argument("--check", action="store_true",
                    help="write nothing; print a diff and exit 1 if a file is not formatted")
    fm.set_defaults(run=_cmd_fmt)
    df = sub.add_parser("diff", help="what changed between two specs: ops and cost",
                        description="Compare spec A with spec B: the ops added, removed, replaced or re-parameterised "
                                    "(aligned by op within each repeat), repeat counts, and the cost delta (params, "
                                    "FLOPs, activation memory, KV cache, complexity) at one length.")
    df.add_argument("a", metavar="A", help="the old .evo file")
    df.add_argument("b", metavar="B", help="the new .evo file")
    df.add_argument("--seq", type=_positive, default=1024, metavar="N", help="sequence length for the cost (default 1024)")
    df.add_argument("--batch", type=_positive, default=1, metavar="B", help="batch size (default 1)")
    df.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="element type for the memory figures (default float32)")
    df.add_argument("--json", action="store_true", help="one JSON object")
    _add_set(df)
    df.set_defaults(run=_cmd_diff)
    o = sub.add_parser("ops", help="list the registered ops", description="List every op with its parameters.")
    fmt = o.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="machine-readable output")
    fmt.add_argument("--markdown", action="store_true", help="a markdown table (the README's op table)")
    o.set_defaults(run=_cmd_ops)
