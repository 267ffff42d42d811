"""The vector-decay layers' two forms of the intra-chunk products (attention/_chunked_linear.py, _gsa_kernel.py):
GLA's factorisation exp(B_i) exp(-B_j) (one [C, C] matmul a chunk), and the ratios exp(B_i - B_j) <= 1 one lag at a
time (DecayScores, DecayValues), which a layer takes where some chunk's decay is too fast for the factorisation (a
gate that closes at once; RWKV-6's fast-forgetting channels). Forward + backward of each layer (as
bench_recurrent.py builds it: d_model 256, batch 1, float32, one thread, the process clock, the median of
`--rounds` interleaved rounds), both forms on the same weights (the form forced), beside causal SDPA.

    .venv/bin/python benchmarks/bench_decay_ratios.py [--ns 4096,16384] [--rounds 3]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import evodsl  # noqa: E402
from bench_recurrent import LAYER, train_times  # noqa: E402
from evodsl.ops.attention import _chunked_linear, _gsa_kernel  # noqa: E402

CALLS = {"mha(gla)": "mha(gla, heads=4)", "mha(gsa)": "mha(gsa, heads=4)", "rnn(hgrn2)": "rnn(hgrn2)",
         "rnn(rwkv6)": "rnn(rwkv6)"}
SDPA = ("mha(softmax)", "mha(softmax, heads=4)")


def forced(ratios: bool):
    """Make every call take the ratios (True) or the factorisation (False): the layers' own test, replaced."""
    for mod in (_chunked_linear, _gsa_kernel):
        mod.factorisable = (lambda last: False) if ratios else (lambda last: True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", default="4096,16384")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--d", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ns = [int(n) for n in args.ns.split(",")]
    load0 = os.getloadavg()[0]
    models = {label: evodsl.compile(LAYER.format(d=args.d, call=call)).train() for label, call in CALLS.items()}
    forced(False)
    factorised = train_times(models, ns, args.d, args.rounds)
    forced(True)
    ratios = train_times(models, ns, args.d, args.rounds)
    sdpa = train_times({SDPA[0]: evodsl.compile(LAYER.format(d=args.d, call=SDPA[1])).train()}, ns, args.d,
                       args.rounds)[SDPA[0]]
    print(f"Vector-decay layers, training form (forward + backward ms): the factorised products against the ratios "
          f"one lag at a time; d_model {args.d}, batch 1, float32, 1 thread, CPU clock; torch {torch.__version__}, "
          f"{platform.machine()}, {os.cpu_count()} cores; {datetime.date.today()}; load {load0:.2f} -> "
          f"{os.getloadavg()[0]:.2f}")
    print()
    print("| layer | n | factorised ms | ratios ms | ratios / factorised | causal SDPA ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for label in CALLS:
        for n in ns:
            f, r = factorised[label][n], ratios[label][n]
            print(f"| `{label}` | {n} | {f:.0f} | {r:.0f} | {r / f:.2f} | {sdpa[n]:.0f} |")


if __name__ == "__main__":
    main()
