"""Forward latency of specs/gpt2.evo compiled by evodsl against HF GPT2LMHeadModel (sdpa attention).

Both models: random weights (HF's, copied into the evodsl model, and the logits compared), eval mode, float32,
torch.inference_mode, the same thread count. Runs alternate evodsl / HF, swapping which goes first each pair,
so that drift in machine speed hits both alike; the table gives the median of each and the ratio.

    .venv/bin/python benchmarks/bench_gpt2_vs_hf.py [--seq 256] [--batch 1] [--pairs 30] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
from pathlib import Path

import torch

import evodsl
from _timing import interleaved

SPEC = Path(__file__).resolve().parent.parent / "specs" / "gpt2.evo"
TARGET = 1.05


def hf_gpt2():
    """GPT-2 small as in specs/gpt2.evo. use_cache=False: the evodsl model keeps no KV cache either."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                        activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True,
                        use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def copy_hf_weights(hf, evo) -> None:
    """Load HF's weights into the evodsl model, so both compute the same function (HF's Conv1D keeps [in, out]
    weights, and one fused c_attn for q, k, v)."""
    hs, d = hf.state_dict(), hf.config.n_embd
    sd = {"embed.weight": hs["transformer.wte.weight"], "pos.weight": hs["transformer.wpe.weight"],
          "norm.weight": hs["transformer.ln_f.weight"], "norm.bias": hs["transformer.ln_f.bias"]}
    for i in range(hf.config.n_layer):
        h, e = f"transformer.h.{i}.", f"blocks.{i}."
        pairs = {"norm1": "ln_1", "norm2": "ln_2", "attn.o_proj": "attn.c_proj", "ffn.up_proj": "mlp.c_fc",
                 "ffn.down_proj": "mlp.c_proj"}
        for ours, theirs in pairs.items():
            w = hs[h + theirs + ".weight"]
            sd[e + ours + ".weight"], sd[e + ours + ".bias"] = w if w.dim() == 1 else w.t(), hs[h + theirs + ".bias"]
        ws, bs = hs[h + "attn.c_attn.weight"].split(d, 1), hs[h + "attn.c_attn.bias"].split(d)
        for name, w, b in zip("qkv", ws, bs):
            sd[e + f"attn.{name}_proj.weight"], sd[e + f"attn.{name}_proj.bias"] = w.t(), b
    sd["head.weight"] = sd["embed.weight"]  # tied
    evo.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=True)



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=30, help="timed (evodsl, HF) pairs")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs of each model first")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    evo = evodsl.compile(SPEC, dtype=torch.float32)
    hf = hf_gpt2()
    copy_hf_weights(hf, evo)
    n_evo = sum(p.numel() for p in evo.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, 50257, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    load_before = os.getloadavg()
    runs = {"evodsl": lambda: evo(ids), "HF": lambda: hf(input_ids=ids).logits}
    with torch.inference_mode():
        logits = {name: fn() for name, fn in runs.items()}
        shapes = {name: tuple(t.shape) for name, t in logits.items()}
        assert shapes["evodsl"] == shapes["HF"], f"logits shapes differ: {shapes}"
        diff = (logits["evodsl"] - logits["HF"]).abs().max().item()
        del logits
        times = interleaved(runs, args.warmup, args.pairs)

    load_after = os.getloadavg()
    med = {name: statistics.median(t) for name, t in times.items()}
    ratio = med["evodsl"] / med["HF"]
    paired = statistics.median(e / h for e, h in zip(times["evodsl"], times["HF"]))
    print(f"GPT-2 small forward, batch {args.batch}, seq {args.seq}, float32, inference_mode, "
          f"torch {torch.__version__}, torch.set_num_threads({torch.get_num_threads()}) (of {os.cpu_count()} cores), "
          f"{platform.processor() or platform.machine()}")
    print(f"parameters: evodsl {n_evo:,}, HF {n_hf:,}; logits shape {list(shapes['evodsl'])} (both); "
          f"HF's weights loaded into evodsl, max |logits difference| {diff:.1e}")
    print(f"{args.warmup} warm-up runs each, then {args.pairs} interleaved pairs; 1-min load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after\n")
    print("| model | median ms | min ms | max ms |")
    print("|---|---:|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {med[name]:.1f} | {min(t):.1f} | {max(t):.1f} |")
    verdict = "meets" if ratio <= TARGET else "misses"
    print(f"\nratio evodsl / HF (medians): {ratio:.3f} ({verdict} the <= {TARGET} target); "
          f"median of the per-pair ratios: {paired:.3f}")


if __name__ == "__main__":
    main()
