"""onnxruntime latency of opset 23 exports (fused Attention, RMSNormalization, RotaryEmbedding) against opset 18.

specs/gpt2.evo and specs/llama.evo at a small size (--set-style overrides below) are exported twice with
`evodsl.export` (same weights, seed 0), opset 18 and 23, and each file runs in onnxruntime (CPUExecutionProvider,
all graph optimizations, intra_op_num_threads = --threads, sequential) at each sequence length. Runs alternate
between the two files (benchmarks/_timing.py); the table gives the medians, the ratio and the largest |logits
difference| between the files.

    .venv/bin/python benchmarks/bench_opset.py [--seq 128,512] [--pairs 20] [--threads 1]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import evodsl
from _timing import interleaved

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"gpt2": dict(vocab=1000, d_model=256, heads=4, layers=4),
         "llama": dict(vocab=1000, d_model=256, heads=4, d_ff=688, layers=4)}
FUSED = ("Attention", "RMSNormalization", "RotaryEmbedding", "LayerNormalization", "Softmax")


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", default="128,512", help="comma-separated sequence lengths")
    ap.add_argument("--pairs", type=int, default=20, help="timed pairs per length")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    args = ap.parse_args()
    seqs = [int(s) for s in args.seq.split(",")]
    load = os.getloadavg()[0]
    print(f"onnxruntime {ort.__version__} (CPUExecutionProvider, ORT_ENABLE_ALL, {args.threads} thread), "
          f"{platform.machine()}, {os.cpu_count()} cores, {datetime.date.today().isoformat()}; batch 1, float32; "
          f"{args.warmup} warm-up runs, {args.pairs} interleaved pairs per length\n")
    print("| spec | sizes | seq | opset 18 median ms | opset 23 median ms | 23 / 18 | max abs logits diff | fused nodes at 23 |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, sizes in SMALL.items():
            spec = ROOT / "specs" / f"{name}.evo"
            sessions, nodes = {}, {}
            for opset in (18, 23):
                path = Path(tmp) / f"{name}_{opset}.onnx"
                evodsl.export(spec, path, overrides=sizes, opset=opset)
                sessions[opset] = session(path, args.threads)
                nodes[opset] = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
            fused = ", ".join(f"{op} {nodes[23][op]}" for op in FUSED if nodes[23].get(op))
            for n in seqs:
                ids = np.random.default_rng(n).integers(0, sizes["vocab"], (1, n), dtype=np.int64)
                feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
                runs = {o: (lambda s=s: s.run(None, feed)) for o, s in sessions.items()}
                diff = float(np.abs(runs[18]()[0] - runs[23]()[0]).max())
                times = interleaved(runs, args.warmup, args.pairs)
                med = {o: statistics.median(t) for o, t in times.items()}
                shown = ", ".join(f"{k}={v}" for k, v in sizes.items())
                print(f"| {name} | {shown} | {n} | {med[18]:.2f} | {med[23]:.2f} | {med[23] / med[18]:.3f} "
                      f"| {diff:.1e} | {fused} |")
    print(f"\n1-min load average {load:.2f} before, {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
