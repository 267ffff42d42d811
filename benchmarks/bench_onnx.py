"""Forward latency of specs/gpt2.evo in onnxruntime against torch eager (and torch.compile), from one exported file.

The spec is exported once with `evodsl.export` (opset 18, dynamic batch and sequence axes, the weights
`evodsl.compile` builds from seed 0) and run by onnxruntime (CPUExecutionProvider, all graph optimizations) at
each sequence length; torch runs the module `evodsl.compile` builds (eval, float32, torch.inference_mode).
Both use the same thread count: torch.set_num_threads(N) and SessionOptions.intra_op_num_threads = N
(inter_op 1, sequential execution). Runs alternate torch / onnxruntime, swapping which goes first each pair;
the table gives the medians, the ratio, and the largest |logits difference| between the two. With --inductor,
torch.compile(model, backend="inductor", fullgraph=True) is a third contender (compiled once per length, in its
warm-up; the compile time is printed), with its own ratio and logits difference against eager.

    .venv/bin/python benchmarks/bench_onnx.py [--seq 128,512] [--batch 1] [--pairs 20] [--threads N] [--inductor]
        [--clock wall|cpu]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import evodsl
from _timing import interleaved

SPEC = Path(__file__).resolve().parent.parent / "specs" / "gpt2.evo"



def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", default="128,512", help="comma-separated sequence lengths (default 128,512)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=20, help="timed (torch, onnxruntime) pairs per length")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs of each first, per length")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both (default: all cores)")
    ap.add_argument("--inductor", action="store_true", help="also time torch.compile (inductor) of the same module")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall, or process CPU time (steadier under load; only with --threads 1)")
    args = ap.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu sums every thread's time: use it with --threads 1")
    seqs = [int(s) for s in args.seq.split(",")]

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gpt2.onnx"
        start = time.perf_counter()
        result = evodsl.export(SPEC, path)
        export_s = time.perf_counter() - start
        sess = session(path, args.threads)
        model = evodsl.compile(SPEC)
        rows = []
        for n in seqs:
            ids = torch.randint(0, 50257, (args.batch, n), generator=torch.Generator().manual_seed(n))
            feed = {result.input_name: ids.numpy(), "attention_mask": np.ones_like(ids.numpy())}
            runs = {"torch": lambda: model(ids), "onnxruntime": lambda: sess.run(None, feed)}
            extra = {}
            with torch.inference_mode():
                want = model(ids).numpy()
                diff = float(np.abs(want - sess.run(None, feed)[0]).max())
                if args.inductor:
                    torch._dynamo.reset()
                    compiled = torch.compile(model, backend="inductor", fullgraph=True)
                    start = time.perf_counter()
                    got = compiled(ids).numpy()
                    extra = {"compile_s": time.perf_counter() - start, "diff": float(np.abs(want - got).max())}
                    runs["inductor"] = lambda: compiled(ids)
                times = interleaved(runs, args.warmup, args.pairs, args.clock)
            rows.append((n, times, diff, extra))
    load_after = os.getloadavg()

    print(f"GPT-2 small forward (specs/gpt2.evo), batch {args.batch}, float32; torch {torch.__version__} eager "
          f"(inference_mode) vs onnxruntime {ort.__version__} (CPUExecutionProvider, ORT_ENABLE_ALL); "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"threads: torch.set_num_threads({torch.get_num_threads()}), onnxruntime intra_op_num_threads="
          f"{args.threads}, inter_op_num_threads=1")
    print(f"one export with dynamic axes: {export_s:.1f} s, {result.bytes / 2**20:.0f} MiB, opset 18; "
          f"{args.warmup} warm-up runs each, then {args.pairs} interleaved pairs per length; 1-min load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after\n")
    print(f"clock: {args.clock}\n")
    print("| seq | torch median ms | onnxruntime median ms | ratio ORT / torch | torch min-max ms | ORT min-max ms "
          "| max abs logits diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, times, diff, _ in rows:
        med = {name: statistics.median(t) for name, t in times.items()}
        t, o = times["torch"], times["onnxruntime"]
        print(f"| {n} | {med['torch']:.1f} | {med['onnxruntime']:.1f} | {med['onnxruntime'] / med['torch']:.3f} "
              f"| {min(t):.1f}-{max(t):.1f} | {min(o):.1f}-{max(o):.1f} | {diff:.1e} |")
    if args.inductor:
        print("\n| seq | torch.compile (inductor) median ms | ratio / eager | ratio / onnxruntime | min-max ms "
              "| compile s | max abs logits diff vs eager |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for n, times, _, extra in rows:
            med = {name: statistics.median(t) for name, t in times.items()}
            c = times["inductor"]
            print(f"| {n} | {med['inductor']:.1f} | {med['inductor'] / med['torch']:.3f} | "
                  f"{med['inductor'] / med['onnxruntime']:.3f} | {min(c):.1f}-{max(c):.1f} | {extra['compile_s']:.0f} "
                  f"| {extra['diff']:.1e} |")


if __name__ == "__main__":
    main()
