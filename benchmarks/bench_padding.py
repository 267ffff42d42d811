"""What a padding mask and T5's learned bias cost in softmax attention, one layer, forward, 1 thread.

Rows, each against plain causal SDPA at the same size (the flash path): a right-padded attention_mask (the last
quarter of every other row padded: a causal op needs no mask for it and keeps its fast path), the same batch
left-padded (a [b, 1, n, n] bool mask then goes to SDPA), an all-ones mask (dropped before the kernel), pos(t5_bias) with its Toeplitz layout (buckets of the 2n - 1 distances, one
[h, n, n] copy) and the same bias gathered per pair (buckets of all n^2 distances, the export path).
Interleaved pairs, medians (benchmarks/_timing.py).

    .venv/bin/python benchmarks/bench_padding.py [--ns 512,2048] [--d 256] [--heads 4] [--batch 2] [--pairs 15]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved  # noqa: E402

from evodsl.backends.lower_torch import key_padding, right_padded  # noqa: E402
from evodsl.ops import Ctx, load_all, lookup  # noqa: E402
from evodsl.ops.registry import OpEnv  # noqa: E402


def build(d: int, heads: int, pos=None):
    op = lookup("mha", "softmax")
    pos_pair = None if pos is None else (lookup("pos", pos), lookup("pos", pos).params(heads=heads))
    env = OpEnv(in_shapes=(("b", "n", d),), causal=True, pos=pos_pair)
    torch.manual_seed(0)
    attn = op.module(op.params(heads=heads), env).eval()
    table = None if pos is None else pos_pair[0].module(pos_pair[1], env).eval()
    return attn, table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", default="512,2048")
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_all()
    attn, _ = build(args.d, args.heads)
    t5, table = build(args.d, args.heads, "t5_bias")
    print(f"softmax attention, causal, d {args.d}, {args.heads} heads, batch {args.batch}, float32, forward "
          f"(inference_mode); torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores, "
          f"{args.threads} thread(s); {datetime.date.today()}; load {os.getloadavg()[0]:.2f}")
    print()
    print("| n | SDPA ms | right-padded ms | left-padded ms | all-ones mask ms | t5_bias (Toeplitz) ms "
          "| t5_bias (per pair) ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in [int(s) for s in args.ns.split(",")]:
        x = torch.randn(args.batch, n, args.d, generator=torch.Generator().manual_seed(n))
        padded = torch.ones(args.batch, n, dtype=torch.bool)
        padded[::2, 3 * n // 4:] = False
        ones = torch.ones(args.batch, n, dtype=torch.long)
        left = padded.flip(1)

        def with_table(ctx, gather=False):
            table(x, ctx)
            if gather:  # the export path: every pair's bucket
                ctx.extra["t5_bias"] = PerPair(table)
            return t5(x, ctx)

        runs = {
            "sdpa": lambda: attn(x, Ctx()),
            "padded": lambda: attn(x, Ctx(mask=padded, right_padded=right_padded(padded))),  # as EvoModel does
            "left": lambda: attn(x, Ctx(mask=left, right_padded=right_padded(left))),
            "ones": lambda: attn(x, Ctx(mask=key_padding(ones))),  # EvoModel's check, then no mask
            "t5": lambda: with_table(Ctx()),
            "t5_pairs": lambda: with_table(Ctx(), gather=True),
        }
        with torch.inference_mode():
            times = interleaved(runs, warmup=2, pairs=args.pairs)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {n} | {med['sdpa']:.1f} | {med['padded']:.1f} | {med['left']:.1f} | {med['ones']:.1f} | {med['t5']:.1f} | "
              f"{med['t5_pairs']:.1f} |")


class PerPair:
    """T5's table computing the dense bias as the export path does: buckets of all n x n distances."""

    def __init__(self, table):
        self.table = table

    def bias(self, i, j):
        return self.table.bias(i, j)

    def dense(self, n, device):
        idx = torch.arange(n, device=device)
        return self.table.bias(idx[:, None], idx[None, :])


if __name__ == "__main__":
    main()
