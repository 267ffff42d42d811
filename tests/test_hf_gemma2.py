"""Gemma 2 against HF transformers' Gemma2ForCausalLM, built from config objects only (nothing downloaded): the
imported spec has HF's parameter count at the 2B and 27B configurations (meta device) and at a small one; a small random HF
model (sliding window 16, query_pre_attn_scalar unlike head_dim, both soft-caps), imported with `evodsl.from_hf`
and `evodsl.load_hf`, gives HF's logits at 7 and 64 tokens (64 spans four windows), its padded batch's, and its
greedy tokens past the window (decoding: mha(local)'s window cache against HF's sliding cache); another layer
pattern and bidirectional attention are refused (E415)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import evodsl
from evodsl.cli import main
from spechelpers import assert_hf_config_refused

import transformers  # noqa: E402 - a dev dependency: missing, these tests fail

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, query_pre_attn_scalar=24, sliding_window=16, max_position_embeddings=128,
             eos_token_id=None)  # no end token: greedy decoding runs its 16 steps on both sides


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


SIZES = {"2b": ({}, 2_614_341_888),  # 26 layers, d 2304, 8 heads of 256, 4 K/V heads
         "27b": (dict(hidden_size=4608, intermediate_size=36864, num_hidden_layers=46, num_attention_heads=32,
                      num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144), 27_227_128_320)}  # scale 1/12


@pytest.mark.parametrize("size", SIZES)
def test_parameter_count(size):
    over, want = SIZES[size]
    config = transformers.Gemma2Config(**over)
    with torch.device("meta"):
        hf = transformers.Gemma2ForCausalLM(config)
    ours = evodsl.compile(evodsl.from_hf(config), device="meta")
    assert count(ours) == count(hf) == want


def test_shipped_spec_costs_hf_2b_parameters():
    """specs/gemma2_2b.evo (from-hf's spec of the default Gemma2Config, the 2B model): `evodsl cost` counts HF's
    parameters, and the spec is what from-hf writes from that config."""
    with torch.device("meta"):
        hf = transformers.Gemma2ForCausalLM(transformers.Gemma2Config())
    spec = Path(__file__).resolve().parents[1] / "specs" / "gemma2_2b.evo"
    assert evodsl.cost(spec)["params"] == count(hf) == SIZES["2b"][1]
    shipped = [ln for ln in spec.read_text().splitlines() if ln and not ln.startswith("#")]
    written = [ln for ln in evodsl.from_hf(transformers.Gemma2Config()).splitlines() if ln and not ln.startswith("#")]
    assert [ln.split("#")[0].rstrip() for ln in shipped] == [ln.split("#")[0].rstrip() for ln in written]


def hf_and_ours(seed: int, **over):
    config = transformers.Gemma2Config(**{**SMALL, **over})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf = transformers.Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # the norms' gains away from 0 (HF's 1 + w)
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ours = evodsl.compile(evodsl.from_hf(config))
    evodsl.load_hf(ours, hf.state_dict(), config)  # fills every evodsl tensor, or says which it cannot
    assert count(ours) == count(hf)
    return hf, ours


def close(got, want) -> bool:
    return (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


@pytest.mark.parametrize("layers", [2, 3], ids=["pair", "odd"])
def test_logits_match_hf_with_its_weights(layers):
    hf, ours = hf_and_ours(layers, num_hidden_layers=layers)
    for n in (7, 64):
        ids = torch.randint(0, 97, (2, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            want, got = hf(ids).logits, ours(ids)
        assert got.shape == want.shape and close(got, want), n


def test_window_and_scale_matter():
    """The checks above would miss a wrong window or scale only if they changed nothing: they do."""
    hf, ours = hf_and_ours(0, num_hidden_layers=2)
    ids = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(0))
    for over in ({"sliding_window": 17}, {"query_pre_attn_scalar": 16}):
        other = transformers.Gemma2Config(**{**SMALL, "num_hidden_layers": 2, **over})
        wrong = evodsl.compile(evodsl.from_hf(other))
        evodsl.load_hf(wrong, hf.state_dict(), other)
        with torch.no_grad():
            assert not close(wrong(ids), ours(ids)), over


def test_padded_batch_and_greedy_tokens_match_hf():
    hf, ours = hf_and_ours(1, num_hidden_layers=2)
    ids = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[1, 19:], mask[2, 5:] = 0, 0
    with torch.no_grad():
        want, got = hf(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask)
    real = mask.bool()
    assert close(got[real], want[real])
    prompt = ids[:2, :7]
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                           min_new_tokens=16, pad_token_id=0)
    assert want.shape[1] == 23 > SMALL["sliding_window"]  # the local layers' window slides while decoding
    assert torch.equal(ours.generate(prompt, max_new_tokens=16), want)


def test_spec_reads_the_config(tmp_path):
    config = transformers.Gemma2Config(**{**SMALL, "num_hidden_layers": 2, "attn_logit_softcapping": None,
                                          "final_logit_softcapping": None})
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    assert main(["from-hf", str(tmp_path / "config.json"), "-o", str(tmp_path / "g.evo")]) == 0
    text = (tmp_path / "g.evo").read_text()
    assert text.startswith("# Imported by `evodsl from-hf` from a Hugging Face 'gemma2' config (")
    assert "softcap" not in text and "mha(local, window=window" in text and "scale=q_scale" in text
    assert "q_scale  = 0.2041241452319315" in text  # 24^-1/2


@pytest.mark.parametrize("over, says", [
    ({"layer_types": ["full_attention", "sliding_attention"]}, "a layer pattern other than Gemma 2's"),
    ({"use_bidirectional_attention": True}, "bidirectional attention in a causal LM"),
    ({"attention_dropout": 0.1}, "has no dropout on its weights"),
])
def test_unsupported_features_are_refused(over, says, tmp_path):
    config = transformers.Gemma2Config(**{**SMALL, "num_hidden_layers": 2}).to_dict()
    assert_hf_config_refused({**config, **over}, next(iter(over)), says, tmp_path)
