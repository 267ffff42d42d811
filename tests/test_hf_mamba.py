"""Mamba against HF transformers' MambaForCausalLM, built from config objects only (nothing downloaded): the
imported spec has HF's parameter count at mamba-130m's configuration (meta device) and the shipped
specs/mamba_130m.evo is that import; a small random HF model (its A, D, dt bias and norms moved off their init),
imported with `evodsl.from_hf` and `evodsl.load_hf`, gives HF's logits on its CPU path (the token-by-token scan) at 7
and 45 tokens, and HF's greedy tokens for 16 steps (decoding: ssm(mamba)'s state against HF's cache); a mixer
wider than expand x d is refused (E415)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import evodsl
from evodsl import EvoError

import transformers  # noqa: E402 - a dev dependency: missing, these tests fail

SMALL = dict(vocab_size=97, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
             time_step_rank="auto", eos_token_id=None, pad_token_id=0)
HF_130M = 129_135_360


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_count_at_130m():
    config = transformers.MambaConfig(num_hidden_layers=24)
    with torch.device("meta"):
        hf = transformers.MambaForCausalLM(config)
    ours = evodsl.compile(evodsl.from_hf(config), device="meta")
    assert count(ours) == count(hf) == HF_130M


def test_shipped_spec_is_the_130m_import():
    spec = Path(__file__).resolve().parents[1] / "specs" / "mamba_130m.evo"
    assert evodsl.cost(spec)["params"] == HF_130M
    shipped = [ln for ln in spec.read_text().splitlines() if ln and not ln.startswith("#")]
    written = [ln for ln in evodsl.from_hf(transformers.MambaConfig(num_hidden_layers=24)).splitlines()
               if ln and not ln.startswith("#")]
    assert shipped == written


def hf_and_ours(seed: int, **over):
    config = transformers.MambaConfig(**{**SMALL, **over})
    torch.manual_seed(seed)
    hf = transformers.MambaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # off their init: every A and dt differ, D and the norms' gains away from 1
        for name, p in hf.named_parameters():
            if name.endswith(("A_log", ".D", "norm.weight", "norm_f.weight", "dt_proj.bias")):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    ours = evodsl.compile(evodsl.from_hf(config))
    evodsl.load_hf(ours, hf.state_dict(), config)  # fills every evodsl tensor, or says which it cannot
    assert count(ours) == count(hf)
    return hf, ours


def close(got, want) -> bool:
    return (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


@pytest.mark.parametrize("over", [{}, {"use_bias": True, "use_conv_bias": False, "time_step_rank": 3}],
                         ids=["default", "biases"])
def test_logits_match_hf_with_its_weights(over):
    hf, ours = hf_and_ours(1, **over)
    for n in (7, 45):  # 45: two chunks of 32 and a partial one
        ids = torch.randint(0, 97, (2, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            want, got = hf(ids).logits, ours(ids)
        assert got.shape == want.shape and close(got, want), n


def test_greedy_tokens_match_hf():
    hf, ours = hf_and_ours(2)
    prompt = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                           min_new_tokens=16, pad_token_id=0)
    assert want.shape[1] == 23
    assert torch.equal(ours.generate(prompt, max_new_tokens=16), want)


def test_a_mixer_wider_than_expand_d_is_refused(tmp_path):
    config = transformers.MambaConfig(**SMALL).to_dict()
    config["intermediate_size"] = 100
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config, indent=2))
    with pytest.raises(EvoError, match="E415") as err:
        evodsl.from_hf(path)
    assert "intermediate_size 100 is not expand x hidden_size (64)" in str(err.value)


# ------------------------------------------------------------------------------------------------ Mamba-2

SMALL2 = dict(vocab_size=97, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, num_heads=4, head_dim=16,
              n_groups=2, conv_kernel=4, chunk_size=8, eos_token_id=None, pad_token_id=0)


def test_mamba2_parameter_count_at_the_default_config():
    config = transformers.Mamba2Config()
    with torch.device("meta"):
        hf = transformers.Mamba2ForCausalLM(config)
    ours = evodsl.compile(evodsl.from_hf(config), device="meta")
    assert count(ours) == count(hf)


def test_mamba2_logits_and_greedy_tokens_match_hf():
    """HF's torch_forward (its own chunked SSD at chunk_size 8) and its cache, against ours."""
    config = transformers.Mamba2Config(**SMALL2)
    torch.manual_seed(3)
    hf = transformers.Mamba2ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("A_log", ".D", "norm.weight", "norm_f.weight", "dt_bias")):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    ours = evodsl.compile(evodsl.from_hf(config))
    evodsl.load_hf(ours, hf.state_dict(), config)
    assert count(ours) == count(hf)
    for n in (7, 45):
        ids = torch.randint(0, 97, (2, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            want, got = hf(ids).logits, ours(ids)
        assert got.shape == want.shape and close(got, want), n
    prompt = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                           min_new_tokens=16, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, max_new_tokens=16), want)
