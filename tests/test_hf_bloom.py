"""specs/bloom_alibi.evo against HF's Bloom (built from configs, nothing downloaded): the parameter count of
BloomModel(BloomConfig()), and the logits of BloomForCausalLM with its weights copied in (query_key_value's rows
split per head into q, k, v) at seq 7 and 64, with 8 heads and with 6 (ALiBi's slopes past a power of two)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import evodsl

import transformers  # noqa: E402 - a dev dependency: missing, these tests fail

SPEC = Path(__file__).resolve().parents[1] / "specs" / "bloom_alibi.evo"


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_bloom_parameter_count():
    with torch.device("meta"):
        hf = transformers.BloomModel(transformers.BloomConfig())
    assert count(evodsl.compile(SPEC, device="meta")) == count(hf) == 16_156_544


def _copy_hf_weights(evo, hf) -> None:
    sd, c = hf.state_dict(), hf.config
    ours = {"embed.weight": sd["transformer.word_embeddings.weight"], "head.weight": sd["lm_head.weight"],
            "norm1.weight": sd["transformer.word_embeddings_layernorm.weight"],
            "norm1.bias": sd["transformer.word_embeddings_layernorm.bias"],
            "norm2.weight": sd["transformer.ln_f.weight"], "norm2.bias": sd["transformer.ln_f.bias"]}
    d, h = c.hidden_size, c.n_head
    for i in range(c.n_layer):
        t, e = f"transformer.h.{i}.", f"blocks.{i}."
        w = sd[t + "self_attention.query_key_value.weight"].view(h, 3, d // h, d)
        b = sd[t + "self_attention.query_key_value.bias"].view(h, 3, d // h)
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            ours[e + f"attn.{name}.weight"], ours[e + f"attn.{name}.bias"] = w[:, j].reshape(d, d), b[:, j].reshape(d)
        for theirs, mine in (("input_layernorm", "norm1"), ("self_attention.dense", "attn.o_proj"),
                             ("post_attention_layernorm", "norm2"), ("mlp.dense_h_to_4h", "ffn.up_proj"),
                             ("mlp.dense_4h_to_h", "ffn.down_proj")):
            for part in ("weight", "bias"):
                ours[e + f"{mine}.{part}"] = sd[t + f"{theirs}.{part}"]
    result = evo.load_state_dict(ours, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("d,heads", [(64, 8), (48, 6)])
def test_bloom_logits_match_hf(d, heads):
    config = transformers.BloomConfig(vocab_size=101, hidden_size=d, n_head=heads, n_layer=2)
    torch.manual_seed(0)
    hf = transformers.BloomForCausalLM(config).eval()
    with torch.no_grad():  # every tensor away from its initial value (HF's biases start at 0, its norms at 1)
        for p in hf.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    evo = evodsl.compile(SPEC, overrides={"vocab": 101, "d_model": d, "heads": heads}).eval()
    _copy_hf_weights(evo, hf)
    for n in (7, 64):
        ids = torch.randint(0, 101, (2, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            want, got = hf(ids).logits, evo(ids)
        assert (got - want).abs().max().item() < 1e-4 * max(want.abs().max().item(), 1.0)
