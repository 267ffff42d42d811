"""specs/deberta_base.evo against HF's DebertaModel (built from configs, nothing downloaded): the parameter count
of microsoft/deberta-base's configuration, and, at a small configuration whose k is below the sequence length
(the distances clipped), HF's hidden states from its weights loaded by load_hf (in_proj's rows split per head),
alone and with a padded batch; the spec `evodsl from-hf` writes (also with absolute positions beside the relative
ones), and its refusals."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import evodsl

import transformers  # noqa: E402 - a dev dependency: missing, these tests fail

SPEC = Path(__file__).resolve().parents[1] / "specs" / "deberta_base.evo"
BASE = {"relative_attention": True, "pos_att_type": ["c2p", "p2c"], "position_biased_input": False}  # deberta-base
SMALL = {"vocab": 97, "n_ctx": 6, "d_model": 32, "heads": 4, "d_ff": 64, "layers": 2}


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_deberta_base_parameter_count():
    with torch.device("meta"):
        hf = transformers.DebertaModel(transformers.DebertaConfig(**BASE))
    assert count(evodsl.compile(SPEC, device="meta")) == count(hf) == 138_601_728


@pytest.fixture(scope="module")
def pair():
    config = transformers.DebertaConfig(vocab_size=SMALL["vocab"], hidden_size=SMALL["d_model"],
                                        num_attention_heads=SMALL["heads"], intermediate_size=SMALL["d_ff"],
                                        num_hidden_layers=SMALL["layers"], max_position_embeddings=64,
                                        max_relative_positions=SMALL["n_ctx"], layer_norm_eps=1e-7, **BASE)
    torch.manual_seed(0)
    hf = transformers.DebertaModel(config).eval()
    with torch.no_grad():  # every tensor away from its initial value (HF zeroes the q and v biases)
        for p in hf.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    evo = evodsl.compile(SPEC, overrides=SMALL).eval()
    evodsl.load_hf(evo, hf.state_dict(), config.to_dict())  # the importer's map (evodsl/hf/deberta.py)
    return hf, evo


@pytest.mark.parametrize("n", [5, 7, 64])  # below and above k = 6: the distances clipped
def test_deberta_hidden_states_match_hf(pair, n):
    hf, evo = pair
    ids = torch.randint(0, SMALL["vocab"], (2, n), generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want = hf(input_ids=ids).last_hidden_state
        got = evo(ids)
    assert (got - want).abs().max().item() < 1e-5


def test_deberta_padded_batch_matches_hf(pair):
    hf, evo = pair
    ids = torch.randint(1, SMALL["vocab"], (2, 13), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, 8:] = 0
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = evo(ids, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() < 1e-5


def test_from_hf_writes_the_spec():
    spec = evodsl.from_hf(transformers.DebertaConfig(**BASE).to_dict())
    ours, imported = evodsl.compile(SPEC, device="meta"), evodsl.compile(spec, device="meta")
    assert [(k, v.shape) for k, v in ours.named_parameters()] == [(k, v.shape) for k, v in imported.named_parameters()]


@pytest.mark.parametrize("kind", ["c2p|p2c", "p2c", "c2p"])
def test_absolute_and_relative_positions_import(kind):
    """position_biased_input=true beside relative attention: pos(learned) and pos(deberta), HF's outputs; with
    one position term (pos_att_type)."""
    config = transformers.DebertaConfig(vocab_size=97, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                        num_hidden_layers=2, max_position_embeddings=40, relative_attention=True,
                                        pos_att_type=kind, max_relative_positions=5)
    torch.manual_seed(1)
    hf = transformers.DebertaModel(config).eval()
    evo = evodsl.compile(evodsl.from_hf(config.to_dict())).eval()
    evodsl.load_hf(evo, hf.state_dict(), config.to_dict())
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (evo(ids) - hf(input_ids=ids).last_hidden_state).abs().max().item() < 1e-5


@pytest.mark.parametrize("key,value", [("relative_attention", False), ("pos_att_type", ["p2p"]), ("talking_head", True)])
def test_refuses_what_has_no_form(key, value):
    with pytest.raises(evodsl.EvoError, match=key):
        evodsl.from_hf(transformers.DebertaConfig(**{**BASE, key: value}).to_dict())
