"""Issue 14's table: every state-space, linear-recurrent and long-convolution layer (the ssm, rnn and longconv
families, and issue 14's recurrent mha variants: retention, GLA, DeltaNet, Gated DeltaNet, FWP, Based, GSA, Hedgehog,
Lightning; --all-mha adds every mha variant whose decoding state is constant in the context), beside causal SDPA (mha(softmax))
and mha(linear). Two measurements per layer, one thread, float32, batch 1, d_model 256 (4 heads where a layer has
heads), each layer in a one-layer spec at the sizes benchmarks/complexity_variants.py gives it:

- training form: forward + backward time of the layer (features [1, n, d] -> the layer plus its residual; the loss
  a sum) at n = 1k .. 16k, by the process CPU clock (steady under other load with one thread), the median of
  `--rounds` interleaved rounds; the fitted slope of log(ms) against log(n), beside the slope that `evodsl cost`'s
  own training FLOPs (forward + backward) have over the same n, and the class the cost declares;
- decoding: a byte-level LM around the layer (embed -> norm -> the layer -> norm -> head, vocab 256), prefilled
  with L - 1 tokens (its training form over the prompt), then `--steps` single-token steps; the median per-token
  latency at each context L, the ratio of the last context's to the first's (flat: about 1; SDPA's KV cache grows),
  and the decoding state's bytes (DecodeState.nbytes(), checked equal to `evodsl cost`'s memory.kv_cache).

    .venv/bin/python benchmarks/bench_recurrent.py [--ns 1024,2048,4096,8192,16384] [--contexts 1024,4096,16384]
        [--steps 16] [--rounds 3] [--only mamba,softmax] [--all-mha] [--plot benchmarks/recurrent.png]
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import evodsl  # noqa: E402
from complexity_variants import BIDIRECTIONAL_ONLY, variants  # noqa: E402

SEQUENCE = ("ssm(", "rnn(", "longconv(")
BASELINES = ("mha(softmax)", "mha(linear)")
# issue 14's recurrent mha variants (the rest of the constant-state mha rows join with --all-mha)
WAVE4_MHA = ("retention", "gla", "deltanet", "gated_deltanet", "fwp", "based", "gsa", "hedgehog", "lightning")
LAYER = "d_model = {d}\nmodel layer(causal=true) = input(features, d={d}) -> residual({call})\n"
LM = ("d_model = {d}\nmodel lm(causal=true) = input(tokens, vocab=256) -> embed(token) -> norm(rmsnorm) -> {call} "
      "-> norm(rmsnorm) -> head(lm)\n")


def constant_state(call: str, d: int) -> bool:
    """The layer decodes with a state that does not grow with the context (evodsl cost's kv_cache at two lengths)."""
    src = LM.format(d=d, call=call)
    try:
        a, b = (evodsl.cost(src, seq=n, batch=1)["memory"]["kv_cache"] for n in (1024, 4096))
    except evodsl.EvoError:
        return False
    return a == b > 0


def rows(args) -> list[tuple[str, str]]:
    """(label, call) of every layer the table covers: the sequence families' rows of complexity_variants, issue 14's
    recurrent mha variants (--all-mha: every mha row whose state is constant), the two baselines."""
    out = []
    # the sizes (max_len, theta) for the longest sequence either part runs: the last context and its decoded steps
    longest = max([int(n) for n in args.ns.split(",")] + [int(c) + args.steps for c in args.contexts.split(",")])
    for label, call in variants(argparse.Namespace(**{**vars(args), "ns": f"{args.ns},{longest}"})):
        name = label.split("(", 1)[1].split(",")[0].rstrip(")")
        if name in BIDIRECTIONAL_ONLY:
            continue
        recurrent_mha = label.startswith("mha(") and (name in WAVE4_MHA or args.all_mha) and constant_state(call, args.d)
        if label.startswith(SEQUENCE) or label in BASELINES or recurrent_mha:
            out.append((label, call))
    if args.only:
        keep = args.only.split(",")
        out = [(lbl, c) for lbl, c in out if any(lbl.startswith(f"{f}({k}") for k in keep for f in ("mha", "ssm", "rnn", "longconv"))]
    return out


def kib(nbytes: int) -> str:
    """KiB, to a tenth below 10 (a diagonal state of d numbers is under 1 KiB)."""
    return f"{nbytes / 1024:.1f}" if nbytes < 10 * 1024 else f"{nbytes / 1024:.0f}"


def slope(xs, ys) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def train_times(models: dict, ns: list[int], d: int, rounds: int) -> dict:
    """{label: {n: median ms}} of forward + backward, every layer and n run once a round, in alternating order."""
    g = torch.Generator().manual_seed(0)
    xs = {n: torch.randn(1, n, d, generator=g) for n in ns}
    times = {k: {n: [] for n in ns} for k in models}

    def step(m, n):
        x = xs[n].clone().requires_grad_()
        m(x).sum().backward()

    for k, m in models.items():  # warm up
        step(m, ns[0])
    for r in range(rounds):
        for n in ns:
            order = list(models) if r % 2 == 0 else list(models)[::-1]
            for k in order:
                t0 = time.process_time()
                step(models[k], n)
                times[k][n].append((time.process_time() - t0) * 1e3)
    return {k: {n: statistics.median(v) for n, v in t.items()} for k, t in times.items()}


def decode_latency(src: str, contexts: list[int], steps: int) -> tuple[dict, dict]:
    """({L: median ms per token}, {L: state bytes}) for the LM in `src`, prefilled to each L afresh."""
    model = evodsl.compile(src)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (1, contexts[-1] + steps), generator=g)
    ms, nbytes = {}, {}
    with torch.no_grad():
        for L in contexts:
            _, state = model.decode(ids[:, :L - 1])
            per = []
            for pos in range(L - 1, L - 1 + steps):
                t0 = time.process_time()
                _, state = model.decode(ids[:, pos:pos + 1], state)
                per.append((time.process_time() - t0) * 1e3)
                if pos == L - 1:
                    nbytes[L] = state.nbytes()
                    want = evodsl.cost(src, seq=L, batch=1)["memory"]["kv_cache"]
                    assert nbytes[L] == want, (src, L, nbytes[L], want)
            ms[L] = statistics.median(per)
    return ms, nbytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", default="1024,2048,4096,8192,16384")
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument("--all-mha", action="store_true", help="every mha variant whose decoding state is constant")
    ap.add_argument("--plot", default=None)
    # the sizes complexity_variants reads (bench_complexity's defaults)
    for flag, default in (("window", 128), ("max_span", 256), ("R", 32), ("k", 256), ("r_lambda", 23), ("s_bird", 32),
                          ("landmarks", 16), ("conv", 33), ("stride", 64), ("c", 8), ("radius", 127), ("block", 16),
                          ("r", 16), ("inducing", 16), ("bpt_k", 4)):
        ap.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=type(default), default=default)
    ap.add_argument("--span-init", dest="span_init", type=float, default=0.5)
    args, _ = ap.parse_known_args()
    torch.set_num_threads(args.threads)
    ns = [int(n) for n in args.ns.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    layers = rows(args)
    load0 = os.getloadavg()[0]
    models, declared = {}, {}
    for label, call in layers:
        src = LAYER.format(d=args.d, call=call)
        models[label] = evodsl.compile(src).train()
        costs = [evodsl.cost(src, seq=n, batch=1) for n in ns]
        flops = [c["flops"]["forward"] + c["flops"]["backward"] for c in costs]
        layer = next(x for x in costs[0]["layers"] if x["op"].startswith(("mha(",) + SEQUENCE))
        declared[label] = (slope(ns, flops), layer["complexity"]["time"])
    train = train_times(models, ns, args.d, args.rounds)
    decode = {}
    for label, call in layers:
        try:
            decode[label] = decode_latency(LM.format(d=args.d, call=call), contexts, args.steps)
        except evodsl.EvoError as err:  # reported in the table, not lost with the rest
            print(f"{label}: decoding refused: {err}", file=sys.stderr)
            decode[label] = ({c: float("nan") for c in contexts}, {c: 0 for c in contexts})
    print(f"Recurrent layers: training-form time growth and per-token decode latency; d_model {args.d}, batch 1, "
          f"float32, {args.threads} thread(s), CPU clock; torch {torch.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} cores; {datetime.date.today()}; load {load0:.2f} -> {os.getloadavg()[0]:.2f}")
    print()
    print(f"| layer | cost class | train ms at {ns[0]} | train ms at {ns[-1]} | time slope | cost slope | "
          + " | ".join(f"decode ms at {c}" for c in contexts) + f" | decode {contexts[-1]}/{contexts[0]} | state KiB |")
    print("|---|---|---:|---:|---:|---:|" + "---:|" * (len(contexts) + 2))
    for label, _ in layers:
        t, (ms, nb) = train[label], decode[label]
        print(f"| `{label}` | {declared[label][1]} | {t[ns[0]]:.1f} | {t[ns[-1]]:.1f} | "
              f"{slope(ns, [t[n] for n in ns]):.2f} | {declared[label][0]:.2f} | "
              + " | ".join(f"{ms[c]:.2f}" for c in contexts) + f" | {ms[contexts[-1]] / ms[contexts[0]]:.2f} | "
              f"{kib(nb[contexts[-1]])} |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(15, 6), constrained_layout=True)
        for label, _ in layers:
            style = dict(lw=2.5, color="black") if label in BASELINES else dict(lw=1)
            ls = "--" if label == "mha(linear)" else "-"
            a.plot(ns, [train[label][n] for n in ns], ls, marker="o", ms=3, label=label, **style)
            b.plot(contexts, [decode[label][0][c] for c in contexts], ls, marker="o", ms=3, **style)
        for ax, x, y, title in ((a, "n (tokens)", "forward + backward ms", "training form"),
                                (b, "context length (tokens)", "ms per token (median)", "decoding, one token")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(x)
            ax.set_ylabel(y)
            ax.set_title(title)
            ax.grid(alpha=0.3)
        fig.legend(loc="outside right center", fontsize=7, ncols=2 if len(layers) > 24 else 1)
        fig.savefig(args.plot, dpi=110)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
