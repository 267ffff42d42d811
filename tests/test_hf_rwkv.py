"""RWKV-4 against HF transformers' RwkvForCausalLM, built from config objects only (nothing downloaded): the imported
spec has HF's parameter count at rwkv-4-169m-pile's configuration (meta device) and the shipped specs/rwkv4_169m.evo
is that import; a small random HF model (its decays, bonuses, mixes and norms moved off their init), imported with
`evodsl.from_hf` and `evodsl.load_hf`, gives HF's logits on its CPU path (the token-by-token WKV with its running
max) at 7 and 45 tokens, in training mode and in eval mode with rescale_every = 0, and HF's greedy tokens for 16
steps (decoding: our state against HF's); an attention wider than the model is refused (E415)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import evodsl
from evodsl import EvoError

import transformers  # noqa: E402 - a dev dependency: missing, these tests fail

SMALL = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, intermediate_size=None, rescale_every=0,
             eos_token_id=None, pad_token_id=0, bos_token_id=0)
HF_169M = dict(vocab_size=50277, hidden_size=768, num_hidden_layers=12, context_length=1024)
PARAMS_169M = 169_342_464  # HF's count (test_parameter_count_at_169m)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def hf_169m():
    config = transformers.RwkvConfig(**HF_169M)
    with torch.device("meta"):
        return config, transformers.RwkvForCausalLM(config)


@pytest.mark.slow  # ~19 s: HF's full-size model built on meta
def test_parameter_count_at_169m():
    config, hf = hf_169m()
    ours = evodsl.compile(evodsl.from_hf(config), device="meta")
    assert count(ours) == count(hf) == PARAMS_169M


def test_shipped_spec_is_the_169m_import():
    spec = Path(__file__).resolve().parents[1] / "specs" / "rwkv4_169m.evo"
    config = transformers.RwkvConfig(**HF_169M)
    assert evodsl.cost(spec)["params"] == PARAMS_169M
    shipped = [ln for ln in spec.read_text().splitlines() if ln and not ln.startswith("#")]
    written = [ln for ln in evodsl.from_hf(config).splitlines() if ln and not ln.startswith("#")]
    assert shipped == written


def hf_and_ours(seed: int, **over):
    config = transformers.RwkvConfig(**{**SMALL, **over})
    torch.manual_seed(seed)
    hf = transformers.RwkvForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # off their init: every decay, bonus and mix, the norms' gains and biases
        for name, p in hf.named_parameters():
            if "time_" in name or "ln" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    ours = evodsl.compile(evodsl.from_hf(config))
    evodsl.load_hf(ours, hf.state_dict(), config)  # fills every evodsl tensor, or says which it cannot
    assert count(ours) == count(hf)
    return hf, ours


def close(got, want) -> bool:
    return (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_logits_match_hf_with_its_weights(mode):
    hf, ours = hf_and_ours(1, intermediate_size=80)
    hf.train(mode == "train")
    for n in (7, 45):  # 45: two chunks of 16 and a partial one
        ids = torch.randint(0, 97, (2, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            want, got = hf(ids).logits, ours(ids)
        assert got.shape == want.shape and close(got, want), n


def test_greedy_tokens_match_hf():
    hf, ours = hf_and_ours(2)
    prompt = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=16, do_sample=False, min_new_tokens=16, pad_token_id=0)
    assert want.shape[1] == 23
    assert torch.equal(ours.generate(prompt, max_new_tokens=16), want)


def test_an_attention_wider_than_the_model_is_refused(tmp_path):
    config = transformers.RwkvConfig(**SMALL).to_dict()
    config["attention_hidden_size"] = 48
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config, indent=2))
    with pytest.raises(EvoError, match="E415") as err:
        evodsl.from_hf(path)
    assert "attention_hidden_size 48 is not hidden_size (32)" in str(err.value)
