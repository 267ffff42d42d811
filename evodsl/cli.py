"""The `evodsl` command: check, compile, export, from-hf, cost, diff, fmt, generate, ops. Exit 0 on success, 1 on a spec error, 2 on a usage error."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .diagnostics import Diagnostic, EvoError

EXIT_OK, EXIT_SPEC, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


def _cmd_check(args) -> int:
    import evodsl

    graph = evodsl.parse(Path(args.spec), dict(args.set))
    print(graph)
    for st in graph.streams:
        start = {"input": lambda: f"input {st.source[1]}", "stream": lambda: f"stream {st.source[1]}",
                 "latent": lambda: next(n.op.id for n in _calls_in(graph, st.name))}[st.source[0]]()
        reads = sorted({getattr(n.params, f) for n in _calls_in(graph, st.name) for f in n.op.streams
                        if getattr(n.params, f, None) is not None})
        shape = ", ".join(map(str, graph.node(st.value).meta["shape"]))
        print(f"stream {st.name}: [{shape}], {'causal' if st.causal else 'bidirectional'}, from {start}"
              + (f", reads {', '.join(reads)}" if reads else "")
              + (f", writes {st.writes} (its next segment's value)" if st.writes else ""))
    return EXIT_OK


def _cmd_generate(args) -> int:
    """Generate from a causal LM (or an encoder-decoder, given --source): a text prompt for a byte-level model
    (vocab 256: the prompt's UTF-8 bytes, the output decoded back), token ids (--ids 1,2,3) in and out otherwise."""
    import evodsl
    import torch

    model = evodsl.compile(Path(args.spec), seed=args.seed, overrides=dict(args.set), weights=args.weights)
    byte_level = model.input_shapes and len(model.input_shape) == 2 and _vocab(model) == 256

    def tokens(text: str | None, ids: str | None, what: str):
        if ids is not None:
            return torch.tensor([[int(t) for t in ids.split(",") if t.strip()]])
        if text is None:
            return None
        if not byte_level:
            raise EvoError([Diagnostic("E412", f"a text {what} needs a byte-level model (vocab 256)",
                                       help=f"give token ids: --{'source-' if what == 'source' else ''}ids 1,2,3")])
        return torch.tensor([list(text.encode("utf-8"))])

    prompt = tokens(args.prompt, args.ids, "prompt")
    source = tokens(args.source, args.source_ids, "source")
    gen = torch.Generator().manual_seed(args.seed)
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
              top_k=args.top_k, top_p=args.top_p, eos_token_id=args.eos, generator=gen, use_cache=not args.no_cache)
    if source is not None:
        out = model.generate(source, decoder_input_ids=prompt, **kw)
    else:
        if prompt is None:
            raise EvoError([Diagnostic("E412", "nothing to continue", help="give --prompt TEXT or --ids 1,2,3")])
        out = model.generate(prompt, **kw)
    row = out[0].tolist()
    as_text = byte_level and (args.prompt is not None or (args.ids is None and args.source is not None))
    print(bytes(row).decode("utf-8", errors="replace") if as_text else ",".join(map(str, row)))  # as given
    return EXIT_OK


def _vocab(model) -> int | None:
    head = getattr(model, "output_shape", ())
    return head[-1] if len(head) == 3 and isinstance(head[-1], int) else None


def _calls_in(graph, stream: str):
    return [n for n in graph.calls() if n.meta.get("stream") == stream]


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
    if args.backend == "onnx":
        return _export(args)
    if args.step:
        print("evodsl compile: error: --step exports a decoding step: give --backend onnx -o FILE.onnx",
              file=sys.stderr)
        return EXIT_USAGE
    device = "meta" if args.meta else None
    if args.meta and args.weights:
        print("evodsl compile: error: --meta builds no weights to load --weights into; drop one", file=sys.stderr)
        return EXIT_USAGE
    import torch

    model = evodsl.compile(Path(args.spec), backend=args.backend, seed=args.seed, device=device,
                           overrides=dict(args.set), weights=args.weights, dtype=getattr(torch, args.dtype))
    total = sum(p.numel() for p in model.parameters())
    source = f"weights {args.weights}" if args.weights else f"seed {args.seed}"
    print(f"{model.graph_name}: {type(model).__name__} from {args.spec} (backend {args.backend}, {source})")
    width = max((len(name) for name, _ in model.named_children()), default=4)
    seen: set[int] = set()
    for name, child in model.named_children():
        own = [p for p in child.parameters() if id(p) not in seen]
        shared = sum(1 for p in child.parameters() if id(p) in seen)
        seen.update(id(p) for p in own)
        note = "  (+ shared weights counted above)" if shared else ""
        print(f"  {name:<{width}}  {type(child).__name__:<24} {sum(p.numel() for p in own):>15,d}{note}")
    print(f"parameters: {total:,d} ({_fmt_count(total)})")
    dims = lambda shape: ", ".join(map(str, shape))  # noqa: E731
    first = "input_ids" if model.input_kind == "tokens" else "features"
    shapes = list(model.input_shapes.values())
    length = lambda name: shapes[1][1] if name.startswith("decoder") else shapes[0][1]  # noqa: E731
    takes = [f"{first} [{dims(model.input_shape)}]"] + [
        f"{name} [{dims(shapes[1])}]" if name == "decoder_input_ids" else f"{name} [b, {length(name)}] (optional)"
        for name in model.extra_inputs]
    print(f"inputs: {', '.join(takes)} -> [{dims(model.output_shape)}]")
    for name, causal in model.streams:
        print(f"stream {name}: {'causal' if causal else 'bidirectional'}")
    if args.output:
        if args.meta:
            print("evodsl compile: error: -o needs real weights; drop --meta", file=sys.stderr)
            return EXIT_USAGE
        evodsl.save(model, args.output)
        print(f"wrote {args.output} (load with evodsl.load({str(args.output)!r}))")
    return EXIT_OK


def _assignment(text: str) -> tuple[str, object]:
    """--set NAME=VALUE: VALUE is a whole number, a number, true or false."""
    name, eq, value = text.partition("=")
    if not eq or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    v = value.strip().lower()
    if v in ("true", "false"):
        return name, v == "true"
    try:
        return name, int(v)
    except ValueError:
        try:
            return name, float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--set {name}: {value!r} is not a number, true or false") from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a whole number >= 1: {text!r}")
    return int(text)


def _seq_list(text: str) -> list[int]:
    """'1k,4k,16k' -> [1024, 4096, 16384]; k = 1024, m = 1048576."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = {"k": 1024, "m": 1024 * 1024}.get(part[-1:], 1)
        digits = part[:-1] if mult > 1 else part
        if not digits.isdigit() or int(digits) * mult < 1:
            raise argparse.ArgumentTypeError(f"not a sequence length: {part!r} (e.g. 1024, 4k, 1k,4k,16k)")
        out.append(int(digits) * mult)
    return out


def _cmd_cost(args) -> int:
    import evodsl

    from .report import build_report, cost_data, plot, render_sweep, render_table

    if args.plot and not Path(args.plot).parent.is_dir():
        print(f"evodsl cost: error: output folder does not exist: {Path(args.plot).parent}", file=sys.stderr)
        return EXIT_USAGE
    graphs = {}
    for spec in args.specs:
        graph = evodsl.parse(Path(spec), dict(args.set))
        graphs[Path(spec).stem if Path(spec).stem not in graphs else spec] = graph
    reports = {name: build_report(g, args.dtype, args.decoder_seq) for name, g in graphs.items()}
    if args.json:
        results = [cost_data(r, n, args.batch, args.dtype) for r in reports.values() for n in args.seq]
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    elif len(reports) == 1 and len(args.seq) == 1:
        report = next(iter(reports.values()))
        print(render_table(cost_data(report, args.seq[0], args.batch, args.dtype), args.train, args.formula))
    else:
        print(render_sweep(reports, args.seq, args.batch))
    if args.plot:
        _write_atomic(args.plot, lambda tmp: plot(reports, args.seq, args.batch, tmp))
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK


def _write_atomic(path: str, write) -> None:
    from ._files import write_atomic

    write_atomic(path, write)


def _export(args) -> int:
    import evodsl

    if not args.output:
        print("evodsl: error: the onnx backend writes a file: give -o FILE.onnx", file=sys.stderr)
        return EXIT_USAGE
    if args.output is not None and not Path(args.output).parent.is_dir():
        print(f"evodsl: error: output folder does not exist: {Path(args.output).parent}", file=sys.stderr)
        return EXIT_USAGE
    r = evodsl.export(Path(args.spec), args.output, weights=getattr(args, "weights", None), seed=args.seed,
                      overrides=dict(args.set), step=args.step, dtype=args.dtype, opset=args.opset)
    if args.step:
        from .backends.onnx_step import describe

        print("\n".join(describe(r)))
        return EXIT_OK
    rel = r.max_abs_diff / max(r.output_scale, 1e-30)
    data = " (+ external data)" if r.external_data else ""
    dims = lambda name: ("[batch, decoder_seq]" if name.startswith("decoder") else  # noqa: E731
                         "[batch, seq, d]" if name == "features" else "[batch, seq]")
    ins = ", ".join(f"'{name}' {dims(name)}" for name in r.input_names or (r.input_name,))
    print(f"wrote {r.path}{data}: {r.bytes / 2**20:.1f} MiB, opset {r.opset}, inputs {ins} -> output "
          f"'{r.output_name}'")
    print(f"checked: onnx.checker (full_check) ok; onnxruntime vs torch on a random input: max abs difference "
          f"{r.max_abs_diff:.3g} ({rel:.2g} of the output scale {r.output_scale:.3g})")
    return EXIT_OK


def _cmd_export(args) -> int:
    return _export(args)


def _cmd_from_hf(args) -> int:
    import evodsl

    text = evodsl.from_hf(args.config)
    evodsl.parse(text)  # an import that does not parse is a bug of ours: never write it
    if not args.output:
        print(text, end="")
        return EXIT_OK
    if not Path(args.output).parent.is_dir():
        print(f"evodsl from-hf: error: output folder does not exist: {Path(args.output).parent}", file=sys.stderr)
        return EXIT_USAGE
    _write_atomic(args.output, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    print(f"wrote {args.output} (evodsl check {args.output}; weights: evodsl compile {args.output} --weights FOLDER)")
    return EXIT_OK


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", type=_assignment, action="append", default=[], metavar="NAME=VALUE",
                        help="override a binding of the spec (repeatable), e.g. --set d_model=256")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evodsl", description="Declare, check and build Transformer variants.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    c = sub.add_parser("check", help="validate a spec and print its graph",
                       description="Validate SPEC and print its graph IR with inferred shapes.")
    c.add_argument("spec", metavar="SPEC", help="a .evo file")
    _add_set(c)
    c.set_defaults(run=_cmd_check)
    b = sub.add_parser("compile", help="build a spec with a backend",
                       description="Build SPEC; print a module summary with the parameter count.")
    b.add_argument("spec", metavar="SPEC", help="a .evo file")
    b.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="torch (a module summary; -o saves an artifact) or onnx (-o FILE.onnx) (default torch)")
    b.add_argument("--weights", metavar="WEIGHTS", help="load these weights: an artifact (from compile -o), or an HF "
                   "checkpoint (a folder with config.json and *.safetensors, or a .safetensors file beside config.json)")
    b.add_argument("--step", action="store_true", help="onnx: one decoding step of a causal LM (see export --step)")
    b.add_argument("-o", "--output", metavar="FILE", help="save an artifact (spec + weights); load with evodsl.load")
    b.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    b.add_argument("--meta", action="store_true", help="build on the meta device: no weights are allocated")
    b.add_argument("--opset", type=int, choices=[18, 23], default=18,
                   help="onnx: 18 (default; every runtime), or 23: fused Attention, RMSNormalization and "
                        "RotaryEmbedding nodes where the ops allow")
    b.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="the weights' dtype (default float32); onnx: the exported model's")
    _add_set(b)
    b.set_defaults(run=_cmd_compile)
    e = sub.add_parser("export", help="export a spec to ONNX (= compile --backend onnx)",
                       description="Export SPEC to an ONNX file (opset 18, dynamic batch and sequence axes), "
                                   "check it with the ONNX checker and onnxruntime against torch.")
    e.add_argument("spec", metavar="SPEC", help="a .evo file")
    e.add_argument("-o", "--output", metavar="FILE", required=True, help="the .onnx file to write")
    e.add_argument("--weights", metavar="WEIGHTS", help="export these weights: an artifact (from evodsl compile -o) "
                   "or an HF checkpoint folder / .safetensors file")
    e.add_argument("--seed", type=int, default=0, help="initialisation seed when no --weights (default 0)")
    e.add_argument("--opset", type=int, choices=[18, 23], default=18,
                   help="onnx: 18 (default; every runtime), or 23: fused Attention, RMSNormalization and "
                        "RotaryEmbedding nodes where the ops allow")
    e.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="the exported weights' dtype (default float32; float16 halves the file, onnxruntime runs "
                        "it on CPU)")
    e.add_argument("--step", action="store_true",
                   help="one decoding step of a causal LM: input_ids, attention_mask and the state (past.*) in, "
                        "logits and the next state (present.*) out")
    _add_set(e)
    e.set_defaults(run=_cmd_export)
    f = sub.add_parser("from-hf", help="write the spec of a Hugging Face config (GPT-2, LLaMA, Mistral, Gemma, "
                       "Phi-3, BERT, T5, BART)", description="Import a Hugging Face config.json as a readable .evo spec; its "
                       "weights load with `evodsl compile SPEC --weights FOLDER`.")
    f.add_argument("config", metavar="CONFIG", help="config.json, or a checkpoint folder holding one")
    f.add_argument("-o", "--output", metavar="SPEC", help="the .evo file to write (default: print it)")
    f.set_defaults(run=_cmd_from_hf)
    k = sub.add_parser("cost", help="parameters, FLOPs, memory and complexity, from the graph",
                       description="Cost SPEC analytically (no weights are built). With several specs or "
                                   "sequence lengths, print them side by side with the crossover lengths (against the first spec).")
    k.add_argument("specs", metavar="SPEC", nargs="+", help="one or more .evo files")
    k.add_argument("--seq", type=_seq_list, default=[1024], metavar="N[,N...]",
                   help="sequence length(s), e.g. 1024 or 1k,4k,16k,64k (default 1024)")
    k.add_argument("--decoder-seq", type=_positive, default=None, metavar="M",
                   help="an encoder-decoder's target length m (default: the same as --seq)")
    k.add_argument("--batch", type=_positive, default=1, metavar="B", help="batch size (default 1)")
    k.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="element type of weights and activations (default float32)")
    k.add_argument("--train", action="store_true", help="add backward FLOPs and training memory")
    k.add_argument("--formula", action="store_true", help="print the symbolic totals in b and n")
    k.add_argument("--json", action="store_true", help="one JSON object (a list for sweeps)")
    k.add_argument("--plot", metavar="PNG", help="draw FLOPs and memory against n on log axes")
    _add_set(k)
    k.set_defaults(run=_cmd_cost)
    gn = sub.add_parser("generate", help="continue a prompt with a causal LM (or translate with an encoder-decoder)",
                        description="Generate tokens: a text prompt for byte-level models (vocab 256), token ids "
                                    "otherwise. The weights of an artifact (compile -o), or those of --seed.")
    gn.add_argument("spec", metavar="SPEC", help="a .evo file")
    gn.add_argument("--weights", metavar="WEIGHTS", help="an artifact (evodsl compile SPEC -o FILE) or an HF "
                    "checkpoint folder / .safetensors file")
    gn.add_argument("--prompt", metavar="TEXT", help="the text to continue (byte-level models)")
    gn.add_argument("--ids", metavar="I,J,...", help="the token ids to continue")
    gn.add_argument("--source", metavar="TEXT", help="an encoder-decoder's source text (byte-level models)")
    gn.add_argument("--source-ids", metavar="I,J,...", help="an encoder-decoder's source token ids")
    gn.add_argument("--max-new-tokens", type=_positive, default=32, metavar="N", help="tokens to add (default 32)")
    gn.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    gn.add_argument("--temperature", type=float, default=1.0)
    gn.add_argument("--top-k", type=_positive, default=None, metavar="K")
    gn.add_argument("--top-p", type=float, default=None, metavar="P")
    gn.add_argument("--eos", type=int, default=None, metavar="ID", help="stop a row at this token")
    gn.add_argument("--seed", type=int, default=0, help="weights (without --weights) and sampling seed")
    gn.add_argument("--no-cache", action="store_true",
                    help="run the whole sequence at every token (models whose ops have no step form)")
    _add_set(gn)
    gn.set_defaults(run=_cmd_generate)
    from .cli_tools import add_tool_commands

    add_tool_commands(sub)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)  # usage errors exit 2 (argparse)
    from . import progress

    if not getattr(args, "json", False):
        progress.enable()  # on a terminal only: piped or redirected stderr stays clean
    try:
        return args.run(args)
    except EvoError as err:
        print(err.render(), file=sys.stderr)
        return EXIT_SPEC
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `evodsl ops | head`: the reader has gone; nothing more to say
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as err:  # noqa: BLE001 - a bug of ours: say so, without a traceback
        print(f"evodsl: internal error: {type(err).__name__}: {err}\n"
              f"  = help: this is a bug in evodsl; set EVODSL_TRACEBACK=1 to see where", file=sys.stderr)
        import os

        if os.environ.get("EVODSL_TRACEBACK"):
            raise
        return EXIT_INTERNAL
    finally:
        progress.disable()


if __name__ == "__main__":
    sys.exit(main())
