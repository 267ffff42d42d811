"""HF interop costs: importing configs at 7B dimensions, and the forward time of an HF-loaded model against HF.

1. For each family `evodsl.from_hf` imports a 7B-class config (HF's defaults where they are 7B, else the family's
   7B sizes) and `evodsl.compile(..., device="meta")` builds it without weights: seconds for each, and the
   parameter count against HF's model built on the meta device.
2. A LLaMA-style 1B-class model (Llama 3.2 1B's sizes, random weights): HF's LlamaForCausalLM
   (attn_implementation="sdpa") and the imported spec with HF's weights loaded, float32, eval, one thread, the
   same token ids; forward time of each at --seq, interleaved (benchmarks/_timing.py), and the logits' largest
   difference.

    .venv/bin/python benchmarks/bench_hf.py [--seq 128] [--pairs 5] [--threads 1] [--skip-forward]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
import transformers

import evodsl
from _timing import interleaved

SEVEN_B = {  # family: (config class, model class, config keyword arguments)
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,  # GPT-2's shape scaled to 7B
             dict(n_embd=4096, n_layer=32, n_head=32, n_positions=2048)),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
               dict(vocab_size=128256, intermediate_size=14336, num_key_value_heads=8,
                    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192})),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, {}),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM,  # Phi-3-small's width and depth
             dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_key_value_heads=8)),
    "bert": (transformers.BertConfig, transformers.BertModel,  # BERT's shape scaled to 7B
             dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=16384)),
    "t5": (transformers.T5Config, transformers.T5ForConditionalGeneration,  # T5 v1.1 XXL's 11B, the nearest
           dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
                tie_word_embeddings=False)),
    "bart": (transformers.BartConfig, transformers.BartForConditionalGeneration,
             dict(d_model=4096, encoder_layers=16, decoder_layers=16, encoder_attention_heads=32,
                  decoder_attention_heads=32, encoder_ffn_dim=16384, decoder_ffn_dim=16384)),
}
ONE_B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, max_position_embeddings=2048,
             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def imports() -> None:
    print("| family | import ms | build on meta s | parameters | HF's (meta) | equal |")
    print("|---|---:|---:|---:|---:|---|")
    for family, (config_cls, model_cls, kwargs) in SEVEN_B.items():
        config = config_cls(**kwargs)
        start = time.perf_counter()
        spec = evodsl.from_hf(config)
        imported = time.perf_counter() - start
        start = time.perf_counter()
        ours = evodsl.compile(spec, device="meta")
        built = time.perf_counter() - start
        with torch.device("meta"):
            theirs = count(model_cls(config))
        print(f"| {family} | {imported * 1e3:.1f} | {built:.2f} | {count(ours):,} | {theirs:,} | "
              f"{'yes' if count(ours) == theirs else 'NO'} |")


def forward(seq: int, pairs: int, warmup: int) -> None:
    config = transformers.LlamaConfig(**ONE_B, attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    ours = evodsl.compile(evodsl.from_hf(config))
    evodsl.load_hf(ours, hf.state_dict(), config)
    ids = torch.randint(0, config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(seq))
    with torch.inference_mode():
        diff = float((hf(ids).logits - ours(ids)).abs().max())
        times = interleaved({"HF": lambda: hf(ids), "evodsl": lambda: ours(ids)}, warmup, pairs)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nLlama 3.2 1B's sizes ({count(hf):,} parameters, random weights), float32, batch 1, seq {seq}, "
          f"{torch.get_num_threads()} thread(s); {warmup} warm-up runs, {pairs} interleaved pairs\n")
    print("| model | median ms | min-max ms |")
    print("|---|---:|---:|")
    for k, v in times.items():
        print(f"| {k} | {med[k]:.0f} | {min(v):.0f}-{max(v):.0f} |")
    print(f"\nratio evodsl / HF: {med['evodsl'] / med['HF']:.3f}; max abs logits difference {diff:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-forward", action="store_true", help="only the imports")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} cores, {datetime.date.today().isoformat()}, 1-min load {os.getloadavg()[0]:.2f}\n")
    imports()
    if not args.skip_forward:
        forward(args.seq, args.pairs, args.warmup)


if __name__ == "__main__":
    main()
