"""Does each attention variant and token mixer grow in n as `evodsl cost` claims? Fitted exponents of forward time
and memory.

For each variant a one-layer spec (`block = mha(VARIANT, ...)` or `block = mixer(VARIANT, ...)` on features
[b, n, d_model], so the layer plus its residual add; d_model 256, 4 heads by default) is compiled and run at n = 1024 .. 16384 (b = 1). The claimed exponent in n is read from
`evodsl.cost(spec)["layers"]` (the mha or mixer layer's complexity strings: "O(n^2 d)" -> 2, "O(n w d)" -> 1,
"O(n d log n)" -> 1 + log). Measured per n:
- forward time (`--clock cpu`, the default: process CPU time, steady under other load with one thread; `--clock
  wall` on a quiet machine): torch.inference_mode, `--warmup` untimed runs, then `--rounds` rounds that run every n once
  (interleaved, so drifting load hits every n alike); the median per n (the exponent fitted to the minima is
  printed beside it: under contention the minimum is the steadier estimate; pass is judged on the median);
- memory, by evodsl.measure.measure_memory (a storage tracker: new tensors only, weights and input excluded):
  the inference peak of a no-grad forward, and the bytes a grad-recording forward keeps for backward (plus the
  output), which is what the claimed memory class counts (saved + output).
The fitted exponent is the least-squares slope of log(value) against log(n). A claim with log n factors is
compared with the slope that n^p (log n)^k itself has over the same n (e.g. 1.13 for n log n over 1k..8k).
Pass: every fitted exponent within --tol (0.25) of the slope that `evodsl cost`'s own numbers have over the same
n (forward FLOPs for time, activations_inference for the inference peak, activations_training for saved +
output): at d 256 and n <= 16k the n d^2 projection terms still lead many quadratic classes, so the class's
exponent alone (shown beside it) is not what these n can show. The raw table also gives the minor page faults per
timed forward (getrusage): large temporaries that glibc hands back to the OS on free and faults in again on the
next call show there, and can bend the time curve (BENCHMARKS.md; the GLIBC_TUNABLES in effect are printed).
Then the crossover with SDPA (mha(softmax) of the same causality): the n from which each variant's forward is
faster, measured (interpolated on log-log axes) and as `evodsl cost` predicts it from forward FLOPs; --plot draws
the time curves on log-log axes.

    .venv/bin/python benchmarks/bench_complexity.py [--ns 1024,...,16384] [--d 256] [--heads 4]
        [--window 128] [--max-span 256] [--span-init 0.5] [--rounds 7] [--threads 1] [--clock cpu] [--causal both]
        [--plot benchmarks/complexity.png]
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import resource
import statistics
import time

import evodsl
from complexity_variants import BIDIRECTIONAL_ONLY, CAUSAL_ONLY, variants


def spec_text(call: str, d: int, causal: bool) -> str:
    return f"d_model = {d}\ncausal = {'true' if causal else 'false'}\nblock = {call}\n"


def power_of_n(cls: str) -> tuple[int, int]:
    """'O(n^2 d + n^2 h)' -> (2, 0); 'O(n w d)' -> (1, 0); 'O(n d log n)' -> (1, 1); 'O(d)' -> (0, 0):
    the largest (power of n, power of log n) over the terms."""
    body = cls.strip()
    if not (body.startswith("O(") and body.endswith(")")):
        raise ValueError(f"not a complexity class: {cls!r}")
    if not body[2:-1].strip():
        raise ValueError(f"empty complexity class {cls!r}")
    best = (0, 0)
    for term in body[2:-1].split(" + "):
        logs = len(re.findall(r"log n", term))
        rest = re.sub(r"log n", "", term).split()
        deg = 0
        for tok in rest:
            m = re.fullmatch(r"n(?:\^(\d+))?", tok)
            if m:
                deg += int(m.group(1) or 1)
        best = max(best, (deg, logs))
    return best


def slope(ns, values) -> float:
    """Least-squares slope of log(value) against log(n)."""
    xs, ys = [math.log(n) for n in ns], [math.log(v) for v in values]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def effective(power: tuple[int, int], ns) -> float:
    """The slope n^p (log n)^k has over these n: p when k = 0."""
    p, k = power
    return slope(ns, [n ** p * math.log(n) ** k for n in ns])


def claim_str(power: tuple[int, int]) -> str:
    p, k = power
    return f"{p}" + (" + log" if k else "")


def mixing_layer(cost: dict) -> dict:
    return next(layer for layer in cost["layers"] if layer["op"].startswith(("mha(", "mixer(", "ssm(", "rnn(", "longconv(")))


def available_memory() -> int:
    """MemAvailable (bytes) from /proc/meminfo; unbounded where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", default="1024,2048,4096,8192,16384", help="sequence lengths, comma separated")
    ap.add_argument("--d", type=int, default=256, help="d_model")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--plot", default="", help="write a log-log plot of forward time against n (PNG)")
    ap.add_argument("--window", type=int, default=128, help="mha(local) window")
    ap.add_argument("--stride", type=int, default=64, help="mha(sparse) stride l (about sqrt n)")
    ap.add_argument("--c", type=int, default=8, help="mha(sparse, pattern=fixed) summary keys per block")
    ap.add_argument("--r", type=int, default=16, help="mha(long_short) projected keys")
    ap.add_argument("--k", type=int, default=256, help="mha(linformer) projected length")
    ap.add_argument("--s-bird", type=int, default=32, help="mha(smart_bird) keys sampled per query and head")
    ap.add_argument("--r-lambda", type=int, default=23, help="mha(lambda) scope of the position lambdas (odd)")
    ap.add_argument("--landmarks", type=int, default=16, help="mha(nystrom) landmarks (dividing every n; at d 32, "
                    "64 keep more of the iteration's [m, m] tensors than of n-long ones up to n = 8k)")
    ap.add_argument("--inducing", type=int, default=16, help="mha(isab) inducing points m, mha(luna) packed length l")
    ap.add_argument("--conv", type=int, default=33, help="mha(nystrom) taps of the convolution of V")
    ap.add_argument("--radius", type=int, default=127, help="mha(tglobal) local radius (LongT5's 127)")
    ap.add_argument("--block", type=int, default=16, help="mha(tglobal) tokens per transient global token")
    ap.add_argument("--max-span", type=int, default=256, help="mha(adaptive_span) max_span")
    ap.add_argument("--R", type=int, default=32, help="mha(adaptive_span) ramp")
    ap.add_argument("--span-init", type=float, default=0.5, help="mha(adaptive_span) span_init (z / max_span)")
    ap.add_argument("--bpt-k", type=int, default=4, help="mha(bpt) spans per level and side")
    ap.add_argument("--warmup", type=int, default=2, help="untimed forwards per n")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds (each runs every n once)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: steadier)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="process CPU time or wall time")
    ap.add_argument("--causal", choices=["true", "false", "both"], default="both")
    ap.add_argument("--tol", type=float, default=0.25, help="largest |fitted - claimed| exponent that passes")
    ap.add_argument("--memory-fraction", type=float, default=0.6,
                    help="skip a variant whose training forward at the largest n needs more than this fraction of "
                         "the available memory (by evodsl cost)")
    ap.add_argument("--only", default="", help="run only the variants whose label (inside mha( or mixer() starts with this")
    args = ap.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu sums every thread's time: use --clock wall with --threads > 1")

    import torch

    from evodsl.measure import measure_memory

    torch.set_num_threads(args.threads)
    tick = time.process_time if args.clock == "cpu" else time.perf_counter
    ns = [int(n) for n in args.ns.split(",")]
    causals = {"true": [True], "false": [False], "both": [True, False]}[args.causal]
    load_before = load()
    print(f"Fitted exponents in n: one mha or mixer layer (+ residual add), b 1, d_model {args.d}, heads {args.heads}, "
          f"float32, n = {', '.join(map(str, ns))}")
    print(f"torch {torch.__version__}, torch.set_num_threads({args.threads}) (of {os.cpu_count()} cores), "
          f"{platform.machine()}, {datetime.date.today().isoformat()}, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}")
    print(f"time ({args.clock} clock): median of {args.rounds} interleaved rounds after {args.warmup} warm-up runs per n, "
          f"torch.inference_mode; memory: evodsl.measure.measure_memory; pass: |fitted - claimed| <= {args.tol}\n")

    results, raw, curves, skipped = [], [], {}, []
    for causal in causals:
        for name, call in variants(args):
            inner = name.split("(", 1)[1]
            if args.only and not inner.startswith(args.only):
                continue
            variant = re.split(r"[,)]", inner, maxsplit=1)[0].strip()  # "soft" is SOFT, not softmax
            if causal and variant in BIDIRECTIONAL_ONLY or not causal and variant in CAUSAL_ONLY:
                continue
            spec = spec_text(call, args.d, causal)
            try:
                layer = mixing_layer(evodsl.cost(spec))
                claimed = {"time": layer["complexity"]["time"], "memory": layer["complexity"]["memory"]}
                full = {n: evodsl.cost(spec, seq=n) for n in ns}
                costs = {n: c["memory"] for n, c in full.items()}
                predicted = {n: c["activations_inference"] for n, c in costs.items()}
                # the growth the cost model itself predicts over these n (lower-order terms included): what the
                # measured slopes are held to; the asymptotic class alone misleads where n d^2 terms still lead
                claimed["slopes"] = {
                    "time": slope(ns, [f["flops"]["forward_matmul"] + f["flops"]["forward_other"]
                                       for f in full.values()]),
                    "peak": slope(ns, [costs[n]["activations_inference"] for n in ns]),
                    "saved": slope(ns, [costs[n]["activations_training"] for n in ns])}
                # measure_memory's grad-recording forward holds what training keeps: skip a variant that the cost
                # model says would not fit (at 16k an O(n^2)-memory layer needs tens of GiB: the OOM killer would
                # end the whole run, its table unprinted)
                need = max(c["activations_training_peak"] for c in costs.values())
                if need > args.memory_fraction * available_memory():
                    skipped.append((name, causal, need))
                    print(f"# skipped {name} causal={causal}: evodsl cost puts its training forward at "
                          f"{need / 2**30:.1f} GiB at n = {ns[-1]}", flush=True)
                    continue
            except Exception as err:  # the variant's cost formula may not exist yet: measure anyway
                claimed, predicted = {"error": f"{type(err).__name__}: {err}"}, {}
            model = evodsl.compile(spec)
            xs = {n: torch.randn(1, n, args.d, generator=torch.Generator().manual_seed(n)) for n in ns}

            mem = {n: measure_memory(model, xs[n]) for n in ns}
            times, faults = {n: [] for n in ns}, {n: 0 for n in ns}
            with torch.inference_mode():
                for n in ns:
                    for _ in range(args.warmup):
                        model(xs[n])
                for _ in range(args.rounds):
                    for n in ns:
                        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                        start = tick()
                        model(xs[n])
                        times[n].append(tick() - start)
                        faults[n] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            med = {n: statistics.median(times[n]) for n in ns}
            fit = {"time": slope(ns, [med[n] for n in ns]), "time_min": slope(ns, [min(times[n]) for n in ns]),
                   "peak": slope(ns, [mem[n].inference_peak for n in ns]),
                   "saved": slope(ns, [mem[n].training_saved for n in ns])}
            results.append((name, causal, claimed, fit))
            sl = claimed.get("slopes", {})
            print(f"# done {name} causal={causal}: fitted time {fit['time']:.2f}, inference peak {fit['peak']:.2f}, "
                  f"saved {fit['saved']:.2f}; cost slopes "
                  f"{', '.join(f'{sl[k]:.2f}' for k in ('time', 'peak', 'saved')) if sl else 'n/a'}; median ms {', '.join(f'{med[n] * 1e3:.1f}' for n in ns)}", flush=True)
            curves[name, causal] = (spec, [med[n] for n in ns])
            for n in ns:
                raw.append((name, causal, n, med[n], min(times[n]), max(times[n]), faults[n] / args.rounds,
                            mem[n].inference_peak, predicted.get(n), mem[n].training_saved))

    print("| variant | causal | claimed time | class exp | cost FLOPs exp | fitted time exp (median) | (min) "
          "| claimed memory | class exp | cost exp (peak, saved) | fitted inference-peak exp | fitted saved exp "
          "| pass |")
    print("|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|")
    failures = 0
    for name, causal, claimed, fit in results:
        if "error" in claimed:
            print(f"| {name} | {str(causal).lower()} | cost failed: {claimed['error'][:60]} | | | {fit['time']:.2f} "
                  f"| {fit['time_min']:.2f} | | | | {fit['peak']:.2f} | {fit['saved']:.2f} | no claim |")
            failures += 1
            continue
        # pass: each measured slope within tol of the slope of the cost model's own numbers over these n (its
        # class, which holds as n grows, is shown beside it; the class must also be well formed)
        slopes, shown = claimed["slopes"], {}
        ok = {f: abs(fit[f] - slopes[f]) <= args.tol for f in ("time", "peak", "saved")}
        for kind in ("time", "memory"):
            try:
                power = power_of_n(claimed[kind])
                shown[kind] = f"{claim_str(power)} ({effective(power, ns):.2f})"
            except ValueError:  # a class with no terms
                shown[kind] = "malformed"
                ok[f"{kind} class"] = False
        verdict = "pass" if all(ok.values()) else "FAIL (" + ", ".join(k for k, v in ok.items() if not v) + ")"
        failures += not all(ok.values())
        print(f"| {name} | {str(causal).lower()} | {claimed['time']} | {shown['time']} | {slopes['time']:.2f} "
              f"| {fit['time']:.2f} | {fit['time_min']:.2f} | {claimed['memory']} | {shown['memory']} "
              f"| {slopes['peak']:.2f}, {slopes['saved']:.2f} | {fit['peak']:.2f} | {fit['saved']:.2f} | {verdict} |")

    print("\nRaw numbers (time in ms; memory in KiB; 'cost' = evodsl.cost's activations_inference at that n)\n")
    print("| variant | causal | n | median ms | min ms | max ms | page faults / forward | inference peak KiB "
          "| cost KiB | saved KiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, causal, n, med, lo, hi, flt, peak, pred, saved in raw:
        pred_s = f"{pred / 1024:.0f}" if pred is not None else "n/a"
        print(f"| {name} | {str(causal).lower()} | {n} | {med * 1e3:.2f} | {lo * 1e3:.2f} | {hi * 1e3:.2f} | {flt:.0f} "
              f"| {peak / 1024:.0f} | {pred_s} | {saved / 1024:.0f} |")
    for name, causal, need in skipped:
        print(f"| {name} | {str(causal).lower()} | skipped: its training forward needs {need / 2**30:.1f} GiB at n = "
              f"{ns[-1]} (evodsl cost), over {args.memory_fraction:.0%} of the memory available |")
    print_crossovers(curves, ns)
    if args.plot:
        plot(curves, ns, args.plot)
    print(f"\n1-min load average {load_before} before, {load()} after; {len(results) - failures} of {len(results)} "
          f"variants pass")


def measured_crossover(ns, ratio) -> str:
    """The n where time / SDPA's time falls through 1, interpolated on log-log axes between the measured n."""
    if ratio[0] <= 1:
        slower = [n for n, r in zip(ns, ratio) if r > 1]
        return f"<= {ns[0]}" + (f" (slower at {', '.join(map(str, slower))})" if slower else "")
    for (n0, r0), (n1, r1) in zip(zip(ns, ratio), zip(ns[1:], ratio[1:])):
        if r1 <= 1:
            f = math.log(r0) / (math.log(r0) - math.log(r1))
            return f"{math.exp(math.log(n0) + f * (math.log(n1) - math.log(n0))):,.0f}"
    return f"> {ns[-1]}"


def forward_flops(spec: str, n: int) -> float:
    flops = evodsl.cost(spec, seq=n)["flops"]
    return flops["forward_matmul"] + flops["forward_other"]


def print_crossovers(curves: dict, ns: list[int]) -> None:
    """Each variant against SDPA (mha(softmax), same causality): the measured crossover of forward time and the
    one `evodsl cost` predicts from forward FLOPs (report.crossover, n from 64 to 2^24)."""
    from evodsl.report import crossover

    print("\nCrossover with SDPA (mha(softmax), same causality): the n from which the variant's forward is faster\n")
    print("| variant | causal | time / SDPA at each n | measured crossover n | predicted by evodsl cost (FLOPs) |")
    print("|---|---|---|---:|---:|")
    for (name, causal), (spec, times) in curves.items():
        base = curves.get(("mha(softmax)", causal))
        if base is None or name == "mha(softmax)":
            continue
        ratio = [t / b for t, b in zip(times, base[1])]
        try:
            x = crossover(lambda n: forward_flops(spec, n), lambda n: forward_flops(base[0], n), lo=64)
            cheaper_at_64 = forward_flops(spec, 64) < forward_flops(base[0], 64)
            predicted = ("<= 64" if cheaper_at_64 and x is None else "never" if x is None
                         else f"{x:,}" if not cheaper_at_64 else f"cheaper below {x:,}")
        except Exception as err:  # a variant whose cost formula fails: say so
            predicted = f"cost failed: {type(err).__name__}"
        print(f"| {name} | {str(causal).lower()} | {', '.join(f'{r:.2f}' for r in ratio)} "
              f"| {measured_crossover(ns, ratio)} | {predicted} |")


def plot(curves: dict, ns: list[int], path: str) -> None:
    """One log-log panel per causality run, each curve labelled by its variant and the legend beside the panel (a
    run has up to ~90 curves); SDPA (mha(softmax)) drawn thick and black, the reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = [c for c in (True, False) if any(k[1] == c for k in curves)]  # a --causal true/false run: one panel
    most = max(sum(k[1] == c for k in curves) for c in sides)
    cols = max(1, -(-most // 32))  # legend columns of at most 32 entries
    fig, axes = plt.subplots(len(sides), 1, figsize=(8 + 2.6 * cols, 7 * len(sides)), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, causal in zip(axes[:, 0], sides):
        mine = [(name, times) for (name, c), (_, times) in curves.items() if c == causal]
        for i, (name, times) in enumerate(mine):
            base = name == "mha(softmax)"
            label = name if len(name) <= 40 else name[:38] + "..)"
            ax.loglog(ns, [t * 1e3 for t in times], marker="o", ms=3, lw=2.8 if base else 1.0,
                      ls="-" if base else styles[(i // 10) % 4], color="black" if base else f"C{i % 10}", label=label)
        ax.set_title(f"{'causal' if causal else 'bidirectional'}: forward time of one layer (d 256, 4 heads, 1 thread)")
        ax.set_xlabel("n")
        ax.set_ylabel("ms (median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6.5, ncol=cols, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"\nplot written to {path}")


if __name__ == "__main__":
    main()
