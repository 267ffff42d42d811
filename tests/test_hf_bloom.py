"""specs/bloom_alibi.evo against HF's Bloom (built from configs, nothing downloaded): the parameter count of
BloomModel(BloomConfig()), the spec `evodsl from-hf` writes for it, and the logits of BloomForCausalLM with its
weights loaded by load_hf (query_key_value's rows split per head into q, k, v) at seq 7 and 64, with 8 heads and
with 6 (ALiBi's slopes past a power of two)."""
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


def test_from_hf_writes_the_spec():
    spec = evodsl.from_hf(transformers.BloomConfig().to_dict())
    ours, imported = evodsl.compile(SPEC, device="meta"), evodsl.compile(spec, device="meta")
    assert [(k, v.shape) for k, v in ours.named_parameters()] == [(k, v.shape) for k, v in imported.named_parameters()]


@pytest.mark.parametrize("d,heads", [(64, 8), (48, 6)])
def test_bloom_logits_match_hf(d, heads):
    config = transformers.BloomConfig(vocab_size=101, hidden_size=d, n_head=heads, n_layer=2)
    torch.manual_seed(0)
    hf = transformers.BloomForCausalLM(config).eval()
    with torch.no_grad():  # every tensor away from its initial value (HF's biases start at 0, its norms at 1)
        for p in hf.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    evo = evodsl.compile(SPEC, overrides={"vocab": 101, "d_model": d, "heads": heads}).eval()
    evodsl.load_hf(evo, hf.state_dict(), config.to_dict())  # the importer's map (evodsl/hf/bloom.py)
    for n in (7, 64):
        ids = torch.randint(0, 101, (2, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            want, got = hf(ids).logits, evo(ids)
        assert (got - want).abs().max().item() < 1e-4 * max(want.abs().max().item(), 1.0)
