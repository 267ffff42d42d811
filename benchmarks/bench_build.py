"""How long evodsl takes to read a spec: parse + validate (evodsl.parse) and build (evodsl.compile).

Cold start is measured in fresh interpreters (python start, `import evodsl`, and the first evodsl.parse, which
imports torch and the op modules and builds the Lark parser). Everything else is measured in this process: the
first call of each case is reported on its own (it pays one-off costs: the first meta-device op imports torch's
meta kernels and decompositions), then the median of --runs calls.

    .venv/bin/python benchmarks/bench_build.py [--runs 7] [--cold-runs 5] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import evodsl

SPECS = Path(__file__).resolve().parent.parent / "specs"
GPT2, LLAMA = SPECS / "gpt2.evo", SPECS / "llama.evo"


def cold_ms(code: str, runs: int) -> float:
    """Median wall time of `python -c code` in a fresh interpreter, start to exit."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=SPECS.parent)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def warm_ms(fn, runs: int) -> tuple[float, float, object]:
    """(first call ms, median ms of the next `runs` calls, last result)."""
    start = time.perf_counter()
    result = fn()
    first = (time.perf_counter() - start) * 1e3
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1e3)
    return first, statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7, help="timed calls per case (after one untimed call)")
    ap.add_argument("--cold-runs", type=int, default=5, help="fresh interpreters per cold-start row")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    args = ap.parse_args()

    cold = [
        ("python start (`python -c pass`)", "pass"),
        ("python start + `import evodsl`", "import evodsl"),
        ("python start + `import torch` (for scale: the first parse imports it)", "import torch"),
        ("python start + `import evodsl` + first parse(gpt2.evo)", f"import evodsl; evodsl.parse({str(GPT2)!r})"),
        ("python start + `import evodsl` + first compile(llama.evo, device=\"meta\")",
         f"import evodsl; evodsl.compile({str(LLAMA)!r}, device='meta')"),
    ]
    print(f"Cold start: median of {args.cold_runs} fresh interpreters ({sys.executable})\n")
    print("| step | median ms |")
    print("|---|---:|")
    for label, code in cold:
        print(f"| {label} | {cold_ms(code, args.cold_runs):.0f} |")

    import torch

    torch.set_num_threads(args.threads)
    cases = [
        ("parse + validate", "gpt2.evo", lambda: evodsl.parse(GPT2)),
        ("compile, real weights (cpu, fp32)", "gpt2.evo", lambda: evodsl.compile(GPT2)),
        ("compile, device=\"meta\"", "gpt2.evo", lambda: evodsl.compile(GPT2, device="meta")),
        ("parse + validate", "llama.evo", lambda: evodsl.parse(LLAMA)),
        ("compile, device=\"meta\"", "llama.evo", lambda: evodsl.compile(LLAMA, device="meta")),
    ]
    print(f"\nIn process: one untimed first call, then median of {args.runs} calls; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| spec | step | parameters | first call ms | median ms |")
    print("|---|---|---:|---:|---:|")
    for step, spec, fn in cases:
        first, med, result = warm_ms(fn, args.runs)
        params = f"{sum(p.numel() for p in result.parameters()):,}" if isinstance(result, torch.nn.Module) else ""
        print(f"| {spec} | {step} | {params} | {first:.1f} | {med:.1f} |")
        del result


if __name__ == "__main__":
    main()
