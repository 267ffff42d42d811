"""specs/deberta_base.evo against HF's DebertaModel (built from configs, nothing downloaded): the parameter count
of microsoft/deberta-base's configuration, and, at a small configuration whose k is below the sequence length
(the distances clipped), HF's hidden states from its weights copied in, alone and with a padded batch."""
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


def _copy_hf_weights(evo, hf, heads: int) -> None:
    """HF's DeBERTa tensors into the spec's model: in_proj's rows, laid out per head as (q, k, v), split."""
    sd = hf.state_dict()
    ours = {"embed.weight": sd["embeddings.word_embeddings.weight"], "pos.weight": sd["encoder.rel_embeddings.weight"],
            "norm.weight": sd["embeddings.LayerNorm.weight"], "norm.bias": sd["embeddings.LayerNorm.bias"]}
    for i in range(hf.config.num_hidden_layers):
        h, e = f"encoder.layer.{i}.", f"blocks.{i}."
        w = sd[h + "attention.self.in_proj.weight"]
        d = w.shape[1]
        qkv = w.view(heads, 3, d // heads, d)
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            ours[e + f"attn.{name}.weight"] = qkv[:, j].reshape(d, d)
        ours[e + "attn.q_proj.bias"] = sd[h + "attention.self.q_bias"]
        ours[e + "attn.v_proj.bias"] = sd[h + "attention.self.v_bias"]
        for theirs, mine in (("attention.output.dense", "attn.o_proj"), ("attention.output.LayerNorm", "norm1"),
                             ("attention.self.pos_q_proj", "attn.pos.pos_q_proj"), ("intermediate.dense", "ffn.up_proj"),
                             ("output.dense", "ffn.down_proj"), ("output.LayerNorm", "norm2")):
            for part in ("weight", "bias"):
                ours[e + f"{mine}.{part}"] = sd[h + f"{theirs}.{part}"]
        ours[e + "attn.pos.pos_proj.weight"] = sd[h + "attention.self.pos_proj.weight"]
    missing, unexpected = evo.load_state_dict(ours, strict=True), None
    assert not missing.missing_keys and not missing.unexpected_keys and unexpected is None


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
    _copy_hf_weights(evo, hf, SMALL["heads"])
    return hf, evo


@pytest.mark.parametrize("n", [5, 17])  # below and above k = 6: the distances clipped
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
