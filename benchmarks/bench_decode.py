"""Per-token decode latency against context length: softmax attention (its K/V cache grows with the context),
local attention (a ring buffer of the last w keys: flat once the context passes w) and linear attention (the
running sums S and z: flat). Three causal byte-level LMs that differ only in their attention op (d_model 256,
4 heads, 4 layers, SwiGLU, RoPE, float32, batch 1, 1 thread). Each is prefilled with a prompt, then decodes one
token at a time up to the largest context; the latency at context L is the median of the `--steps` steps from
L on, and the state is `DecodeState.nbytes()` there (checked equal to `evodsl cost`'s memory.kv_cache). The
models run interleaved, step by step, so a change of machine load hits all three alike.

    .venv/bin/python benchmarks/bench_decode.py [--contexts 256,512,...,8192] [--steps 16] [--window 512]
        [--threads 1] [--plot benchmarks/decode_latency.png]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evodsl  # noqa: E402

SPEC = """
vocab = 256
d_model = 256
heads = 4
block = norm(rmsnorm) -> {mha} -> norm(rmsnorm) -> ffn(swiglu)
model lm(causal=true) = input(tokens) -> embed(token) -> pos(rope) -> repeat(block, 4) -> norm(rmsnorm)
    -> head(lm)
"""
OPS = {"softmax": "mha(softmax)", "local": "mha(local, window={w})", "linear": "mha(linear)"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="256,512,1024,2048,4096,8192")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    srcs = {k: SPEC.format(mha=v.format(w=args.window)) for k, v in OPS.items()}
    models = {k: evodsl.compile(s) for k, s in srcs.items()}
    load0 = os.getloadavg()[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (1, contexts[-1] + args.steps), generator=g)
    first = contexts[0] - 1  # the prompt: the first step then runs at context contexts[0]
    states, ms, nbytes = {}, {k: {} for k in models}, {k: {} for k in models}
    with torch.no_grad():
        for k, m in models.items():
            _, states[k] = m.decode(ids[:, :first])
        marks = {c: c - 1 for c in contexts}  # the step whose token is at position c - 1 sees c tokens
        for pos in range(first, contexts[-1] - 1 + args.steps):
            window = next((c for c in contexts if marks[c] <= pos < marks[c] + args.steps), None)
            order = list(models) if pos % 2 == 0 else list(models)[::-1]
            for k in order:
                t0 = time.perf_counter()
                _, states[k] = models[k].decode(ids[:, pos:pos + 1], states[k])
                dt = (time.perf_counter() - t0) * 1e3
                if window is not None:
                    ms[k].setdefault(window, []).append(dt)
                    if pos == marks[window]:
                        nbytes[k][window] = states[k].nbytes()
                        cost = evodsl.cost(srcs[k], seq=window, batch=1)["memory"]["kv_cache"]
                        assert nbytes[k][window] == cost, (k, window, nbytes[k][window], cost)
    med = {k: {c: statistics.median(v[c]) for c in contexts} for k, v in ms.items()}
    print(f"Per-token decode latency, byte-level LM (d_model 256, 4 heads, 4 layers, SwiGLU, RoPE), batch 1, float32; "
          f"local window {args.window}; median of {args.steps} steps from each context; torch {torch.__version__}, "
          f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s); {datetime.date.today()}; "
          f"load {load0:.2f} -> {os.getloadavg()[0]:.2f}")
    print()
    print("| context | " + " | ".join(f"{k} ms" for k in models) + " | " + " | ".join(f"{k} state KiB" for k in models)
          + " |")
    print("|---:|" + "---:|" * (2 * len(models)))
    for c in contexts:
        print(f"| {c} | " + " | ".join(f"{med[k][c]:.2f}" for k in models) + " | "
              + " | ".join(f"{nbytes[k][c] / 1024:.0f}" for k in models) + " |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
        for k in models:
            a.plot(contexts, [med[k][c] for c in contexts], marker="o", label=OPS[k].format(w=args.window))
            b.plot(contexts, [nbytes[k][c] / 2**20 for c in contexts], marker="o", label=k)
        for ax, ylabel in ((a, "ms per token (median)"), (b, "decoding state, MiB")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        a.legend()
        a.set_title("per-token decode latency, 1 thread")
        b.set_title("state held (DecodeState.nbytes)")
        fig.savefig(args.plot, dpi=110)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
