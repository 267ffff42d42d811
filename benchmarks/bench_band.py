"""Causal local attention against causal SDPA: forward time at every window up to n, and peak memory at 16k.

The issue's claim: `mha(local, window=w)` is never slower than causal `mha(softmax)` (F.scaled_dot_product_attention,
is_causal) at any w <= n, keeps its win at small w, and its inference peak (and that of `mha(linear)`) is within
1.1x of SDPA's. One-layer specs (`block = mha(...)`, d 256, 4 heads, float32, batch 1), torch.inference_mode,
1 thread. Time: the two models run interleaved (benchmarks/_timing.py), `--pairs` timed forwards each after a
warm-up, on the process CPU clock by default (`--clock cpu`: steady under other load with one thread; `--clock
wall` for a quiet machine); the median ratio local / softmax is reported (< 1: local is faster). Memory: the no-grad inference peak
of new tensors (evodsl.measure.StorageTracker), weights and input excluded.

    .venv/bin/python benchmarks/bench_band.py [--ns 1024,2048,4096] [--fractions 0.03,0.125,0.25,0.5,0.75,1]
        [--peak-n 16384] [--pairs 5] [--threads 1] [--clock cpu|wall]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import evodsl  # noqa: E402
from evodsl.measure import StorageTracker  # noqa: E402
from _timing import interleaved  # noqa: E402

D, HEADS = 256, 4


def model(mha: str):
    spec = f"d_model = {D}\nheads = {HEADS}\ncausal = true\nblock = mha({mha}, heads={HEADS})\n"
    return evodsl.compile(spec).eval()


def inference_peak(model, x) -> int:
    """Peak bytes of the tensors a no-grad forward creates (output included), weights and input excluded."""
    with torch.no_grad(), StorageTracker([*model.parameters(), *model.buffers(), x]) as tr:
        out = model(x)
        del out
    return tr.peak()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", default="1024,2048,4096")
    ap.add_argument("--fractions", default="0.03,0.125,0.25,0.5,0.75,1", help="windows as fractions of n")
    ap.add_argument("--peak-n", type=int, default=16384)
    ap.add_argument("--peak-windows", default="128,1024")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="process CPU time or wall time")
    args = ap.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu sums every thread's time: use --clock wall with --threads > 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# {datetime.date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), d {D}, {HEADS} heads, {args.clock} clock, "
          f"1-min load average {os.getloadavg()[0]:.2f}")
    print("\n| n | w | softmax ms | local ms | local / softmax |\n|---|---|---|---|---|")
    sdpa = model("softmax")
    worst = 0.0
    for n in (int(v) for v in args.ns.split(",")):
        x = torch.randn(1, n, D)
        for f in (float(v) for v in args.fractions.split(",")):
            w = max(1, round(f * n))
            local = model(f"local, window={w}")
            local.load_state_dict(sdpa.state_dict(), strict=False)
            with torch.inference_mode():
                times = interleaved({"softmax": lambda: sdpa(x), "local": lambda: local(x)}, warmup=1,
                                    pairs=args.pairs, clock=args.clock)
            ratio = statistics.median(a / b for a, b in zip(times["local"], times["softmax"]))
            worst = max(worst, ratio)
            print(f"| {n} | {w} | {statistics.median(times['softmax']):.1f} | "
                  f"{statistics.median(times['local']):.1f} | {ratio:.2f} |", flush=True)
    print(f"\nslowest local / softmax: {worst:.2f} (1-min load average {os.getloadavg()[0]:.2f})")
    n = args.peak_n
    x = torch.randn(1, n, D)
    print(f"\n| n = {n} | inference peak MiB | / softmax |\n|---|---|---|")
    base = inference_peak(sdpa, x)
    print(f"| softmax | {base / 2**20:.1f} | 1.00 |")
    for label in [f"local, window={w}" for w in args.peak_windows.split(",")] + ["linear"]:
        peak = inference_peak(model(label), x)
        print(f"| {label} | {peak / 2**20:.1f} | {peak / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
