"""Greedy generation, GPT-2 small: evodsl's `generate` (its decoding state: a K/V cache per layer) against HF
`GPT2LMHeadModel.generate` (its DynamicCache), the same weights (HF's copied in), prompt 64, 64 new tokens,
batch 1, float32, 1 thread. Interleaved pairs, medians (benchmarks/_timing.py); the outputs are checked equal.

    .venv/bin/python benchmarks/bench_generate.py [--prompt 64] [--new 64] [--pairs 7] [--threads 1]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from _timing import interleaved  # noqa: E402

import evodsl  # noqa: E402


def main() -> None:
    import transformers
    from test_hf_parity import gpt2_weights_to_evodsl

    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = transformers.GPT2Config(attn_implementation="sdpa", pad_token_id=50256)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    evo = evodsl.compile(ROOT / "specs" / "gpt2.evo")
    evo.load_state_dict(gpt2_weights_to_evodsl(hf.state_dict(), 12, 768), strict=True)
    prompt = torch.randint(0, 50257, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompt)

    def run_hf():
        with torch.no_grad():
            return hf.generate(prompt, attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new,
                               do_sample=False)

    def run_evo():
        return evo.generate(prompt, max_new_tokens=args.new)

    same = torch.equal(run_hf(), run_evo())
    times = interleaved({"evodsl": run_evo, "hf": run_hf}, warmup=1, pairs=args.pairs)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"GPT-2 small greedy generation, prompt {args.prompt}, {args.new} new tokens, batch 1, float32; torch "
          f"{torch.__version__}, transformers {transformers.__version__}, {platform.machine()}, {os.cpu_count()} "
          f"cores, {args.threads} thread(s); {datetime.date.today()}; load {os.getloadavg()[0]:.2f}")
    print()
    print("| | evodsl ms | HF ms | evodsl / HF | same tokens |")
    print("|---|---:|---:|---:|---|")
    print(f"| median of {args.pairs} | {med['evodsl']:.0f} | {med['hf']:.0f} | {med['evodsl'] / med['hf']:.2f} | "
          f"{'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
