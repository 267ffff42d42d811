"""Time of `evodsl cost` work (parse, validate, cost formulas, evaluation), start-up excluded, for the LLaMA 7B
spec and the LLaMA 2 70B spec at seq 131072. No weights are allocated: the process's peak RSS is printed."""
from __future__ import annotations

import argparse
import resource
import statistics
import time

t0 = time.perf_counter()
import evodsl  # noqa: E402
from evodsl.ops import load_all  # noqa: E402

load_all()
startup = time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seq", type=int, default=131072)
    args = ap.parse_args()
    print(f"start-up (import evodsl + ops): {startup * 1000:.0f} ms")
    print("| spec | seq | params | forward FLOPs | KV cache (bf16) | first call | median of next |")
    print("|---|---|---|---|---|---|---|")
    for spec in ("specs/llama.evo", "specs/llama2_70b.evo"):
        times = []
        for _ in range(args.runs + 1):
            t = time.perf_counter()
            c = evodsl.cost(spec, seq=args.seq, batch=1, dtype="bfloat16")
            times.append(time.perf_counter() - t)
        print(f"| {spec} | {args.seq} | {c['params']:,} | {c['flops']['forward']:.3e} | "
              f"{c['memory']['kv_cache'] / 2**30:.1f} GiB | {times[0] * 1000:.0f} ms | "
              f"{statistics.median(times[1:]) * 1000:.0f} ms |")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
