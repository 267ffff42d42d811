"""DeepSeek-V2 against HF transformers' DeepseekV2ForCausalLM, built from config objects only (nothing downloaded):
specs/deepseek_v2_lite.evo has the parameters of HF's model at V2-Lite's dimensions with every layer dense; a small
random HF model (dense, 2 layers), imported with `evodsl.from_hf` and `evodsl.load_hf`, gives HF's logits (with and
without query compression), its padded batches' and its greedy tokens; MoE layers and YaRN rope are refused (E415)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import evodsl
from evodsl import EvoError

import transformers  # noqa: E402 - a dev dependency: missing, these tests fail

SPECS = Path(__file__).resolve().parents[1] / "specs"
LITE = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
            num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
            n_routed_experts=64, num_experts_per_tok=6, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
            qk_nope_head_dim=128, v_head_dim=128, rms_norm_eps=1e-6, tie_word_embeddings=False, n_group=1,
            topk_group=1)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def hf_meta(config):
    with torch.device("meta"):
        return transformers.DeepseekV2ForCausalLM(config)


def test_v2_lite_parameter_count():
    """Every layer dense, as the spec (no MoE ffn yet); the released V2-Lite (26 MoE layers) noted beside it."""
    dense = transformers.DeepseekV2Config(**LITE, first_k_dense_replace=27)
    ours = evodsl.compile(SPECS / "deepseek_v2_lite.evo", device="meta")
    assert count(ours) == count(hf_meta(dense)) == 2_606_624_256
    moe = transformers.DeepseekV2Config(**LITE, first_k_dense_replace=1)
    assert count(hf_meta(moe)) == 15_706_484_224  # pending an MoE ffn


def small_config(**over):
    return transformers.DeepseekV2Config(**{
        **LITE, "vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 24, "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 12, "v_head_dim": 16, "first_k_dense_replace": 2, "max_position_embeddings": 64, **over})


def hf_and_ours(seed: int, **over):
    config = small_config(**over)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf = transformers.DeepseekV2ForCausalLM(config).eval()
    with torch.no_grad():  # the norms' gains away from 1
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ours = evodsl.compile(evodsl.from_hf(config))
    evodsl.load_hf(ours, hf.state_dict(), config)  # fills every evodsl tensor, or says which it cannot
    assert count(ours) == count(hf)
    return hf, ours


@pytest.mark.parametrize("q_rank", [None, 20], ids=["no-q-compression", "q-compression"])
def test_logits_match_hf_with_its_weights(q_rank):
    hf, ours = hf_and_ours(0, q_lora_rank=q_rank)
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_padded_batch_and_greedy_tokens_match_hf():
    hf, ours = hf_and_ours(1)
    ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, 9:], mask[2, 4:] = 0, 0
    with torch.no_grad():
        want, got = hf(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() <= 1e-4 * want[real].abs().max().item()
    prompt = ids[:2, :7]
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                           min_new_tokens=12, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, max_new_tokens=12), want)  # our absorbed steps against HF's cache


@pytest.mark.parametrize("over, key", [({"first_k_dense_replace": 1}, "mixture-of-experts"),
                                       ({"rope_scaling": {"type": "yarn", "factor": 40.0,
                                                          "original_max_position_embeddings": 4096}}, "yarn")])
def test_moe_layers_and_yarn_are_refused(over, key):
    config = small_config(**{k: v for k, v in over.items() if k != "rope_scaling"}).to_dict()
    if "rope_scaling" in over:  # as the released V2-Lite config.json writes it (no rope_parameters)
        config.pop("rope_parameters", None)
        config["rope_scaling"] = over["rope_scaling"]
    with pytest.raises(EvoError, match=f"E415.*{key}"):
        evodsl.from_hf(config)
