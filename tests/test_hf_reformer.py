"""Reformer against HF transformers' ReformerModelWithLMHead (is_decoder=true) and ReformerForMaskedLM (the same
stack, bidirectional), built from config objects only (nothing downloaded): the imported spec (reversible stack,
pos(axial), alternating mha(chunk, before=1, wrap=true) and mha(lsh, form=hf)) has HF's parameters (less the
lm_head.bias its forward never reads) at the default config and a small one (meta device); a small random HF model
imported with `evodsl.from_hf` and `evodsl.load_hf` gives HF's logits in eval mode at lengths up to a chunk and
multiples of it, causal and bidirectional, one and two hash rounds (two rounds causal in float64: HF's float32
exp(dots - logsumexp) rounds a row whose only key is the query's own -1e5, ours does not); the layer-by-layer
parity of both attentions; specs/reformer.evo is what from-hf writes for ReformerConfig(); refusals (E415)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import evodsl
from ophelpers import assert_no_leak, make_op
from spechelpers import assert_hf_config_refused

import transformers  # noqa: E402 - a dev dependency: missing, these tests fail
from transformers.models.reformer.modeling_reformer import LocalSelfAttention, LSHSelfAttention  # noqa: E402

SMALL = dict(vocab_size=50, hidden_size=32, num_attention_heads=2, attention_head_size=16, axial_pos_shape=[4, 8],
             axial_pos_embds_dim=[8, 24], feed_forward_size=40, local_attn_chunk_length=8, lsh_attn_chunk_length=8,
             num_buckets=4, hash_seed=0, max_position_embeddings=32, attn_layers=["local", "lsh", "local", "lsh"])


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def hf_class(config):
    return transformers.ReformerModelWithLMHead if config.is_decoder else transformers.ReformerForMaskedLM


@pytest.mark.parametrize("over", [{}, dict(SMALL, attn_layers=["lsh", "local", "local"], num_hashes=2)],
                         ids=["default", "small"])
def test_parameter_count(over):
    config = transformers.ReformerConfig(**over)
    with torch.device("meta"):
        hf = hf_class(config)(config)
    ours = evodsl.compile(evodsl.from_hf(config), device="meta")
    assert count(ours) == count(hf) - config.vocab_size  # HF's unread lm_head.bias
    assert evodsl.cost(evodsl.from_hf(config))["params"] == count(ours)


def test_shipped_spec_is_what_from_hf_writes_for_the_default_config():
    spec = Path(__file__).resolve().parents[1] / "specs" / "reformer.evo"
    config = transformers.ReformerConfig()
    with torch.device("meta"):
        hf = transformers.ReformerForMaskedLM(config)
    assert evodsl.cost(spec)["params"] == count(hf) - 320 == 5_975_872
    shipped = [ln for ln in spec.read_text().splitlines() if ln and not ln.startswith("#")]
    written = [ln for ln in evodsl.from_hf(config).splitlines() if ln and not ln.startswith("#")]
    assert [ln.split("#")[0].rstrip() for ln in shipped] == [ln.split("#")[0].rstrip() for ln in written]


def hf_and_ours(rounds: int, decoder: bool, dtype=torch.float32):
    config = transformers.ReformerConfig(**SMALL, num_hashes=rounds, is_decoder=decoder)
    torch.manual_seed(0)
    hf = hf_class(config)(config).eval().to(dtype)
    with torch.no_grad():  # every weight away from its init (norms' gains off 1, biases off 0)
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    ours = evodsl.compile(evodsl.from_hf(config), dtype=dtype)
    evodsl.load_hf(ours, hf.state_dict(), config)
    if dtype == torch.float64:  # HF draws its rotations in the vectors' dtype
        torch.manual_seed(0)
        rot = torch.randn(2, 16, rounds, 2, dtype=dtype).permute(0, 2, 1, 3)
        for m in ours.modules():
            if hasattr(m, "rotations"):
                m.rotations.copy_(rot)
    return hf, ours


@pytest.mark.parametrize("rounds,decoder,dtype", [(1, True, torch.float32), (2, True, torch.float64),
                                                  (2, False, torch.float32), (1, False, torch.float32)],
                         ids=["causal", "causal-2-rounds", "bidirectional-2-rounds", "bidirectional"])
def test_logits_match_hf_with_its_weights(rounds, decoder, dtype):
    """n = 7 (under a chunk: HF's plain attention), 16 and 32 (2 and 4 chunks: hashing, look-adjacent with
    wrap-around)."""
    hf, ours = hf_and_ours(rounds, decoder, dtype)
    for n in (7, 16, 32):
        ids = torch.randint(0, 50, (2, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            want, got = hf(ids).logits, ours(ids)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item(), n


def test_the_seed_and_the_wrap_matter():
    """The check above would miss a wrong hash seed or a missing wrap-around only if they changed nothing."""
    hf, ours = hf_and_ours(1, False)
    ids = torch.randint(0, 50, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
        for old, new in (("seed=hash_seed", "seed=1"), ("wrap=true", "wrap=false")):
            spec = evodsl.from_hf(hf.config).replace(old, new)
            assert new in spec
            other = evodsl.compile(spec)
            other.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.endswith("rotations")},
                                  strict=False)  # the weights, not the rotations (the seed's)
            assert (other(ids) - want).abs().max().item() > 1e-3 * want.abs().max().item(), new


@pytest.mark.parametrize("decoder", [False, True])
@pytest.mark.parametrize("kind", ["local", "lsh"])
def test_each_attention_equals_hf_layer(kind, decoder):
    """float64, one layer: mha(chunk, before, after, wrap=true) is LocalSelfAttention (chunks of 4 reading 2 before
    and 1 after), mha(lsh, form=hf) is LSHSelfAttention (3 rounds, 8 buckets, a chunk after too); the output
    projection is HF's ReformerSelfOutput.dense. n = 20: 5 chunks; n = 3: under one."""
    config = transformers.ReformerConfig(hidden_size=32, num_attention_heads=2, attention_head_size=16,
                                         local_attn_chunk_length=4, local_num_chunks_before=2, local_num_chunks_after=1,
                                         lsh_attn_chunk_length=4, lsh_num_chunks_after=1, num_buckets=8, num_hashes=3,
                                         hash_seed=0, is_decoder=decoder, local_attention_probs_dropout_prob=0.0,
                                         lsh_attention_probs_dropout_prob=0.0)
    torch.manual_seed(1)
    hf = (LocalSelfAttention(config) if kind == "local" else LSHSelfAttention(config)).eval().double()
    if kind == "local":
        m, _, _ = make_op("mha", "chunk", d=32, causal=decoder, heads=2, head_dim=16, bias=False, c=4, before=2,
                          after=1, wrap=True)
        pairs = {"q_proj": hf.query, "k_proj": hf.key, "v_proj": hf.value}
    else:
        m, _, _ = make_op("mha", "lsh", d=32, causal=decoder, heads=2, head_dim=16, bias=False, buckets=8, chunk=4,
                          rounds=3, form="hf", after=1)
        pairs = {"q_proj": hf.query_key, "v_proj": hf.value}
        torch.manual_seed(0)
        m.rotations.copy_(torch.randn(2, 16, 3, 4, dtype=torch.float64).permute(0, 2, 1, 3))
    with torch.no_grad():
        for ours, theirs in pairs.items():
            getattr(m, ours).weight.copy_(theirs.weight)
        m.o_proj.weight.copy_(torch.eye(32, dtype=torch.float64))
    for n in (20, 3):
        x = torch.randn(2, n, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            assert (m(x, None) - hf(x).hidden_states).abs().max().item() <= 1e-10, n


def test_rotations_are_hfs_draw():
    m, _, _ = make_op("mha", "lsh", d=32, dtype=torch.float32, heads=2, head_dim=16, buckets=8, rounds=3, form="hf")
    torch.manual_seed(0)  # make_op's seed= is its own: the op's seed stays 0, HF's hash_seed=0
    assert torch.equal(m.rotations, torch.randn(2, 16, 3, 4).permute(0, 2, 1, 3))


@pytest.mark.parametrize("over, key, says", [
    ({"num_buckets": [4, 8]}, "num_buckets", "factorised buckets"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings", "a tied head"),
    ({"attn_layers": ["local", "global"]}, "attn_layers", "Reformer's are 'local' and 'lsh'"),
])
def test_unsupported_features_are_refused(over, key, says, tmp_path):
    assert_hf_config_refused({**transformers.ReformerConfig(**SMALL).to_dict(), **over}, key, says, tmp_path)


def test_local_causal_form_never_leaks():
    """mha(chunk, before=1, wrap=true) causal (HF's decoder local attention): position t reads its chunk up to t and
    the chunk before; the wrap-around reaches later chunks only, which the causal mask removes. (mha(lsh, form=hf)
    causal is HF's too: its chunk boundaries follow the whole sorted sequence, later tokens included, so it has no
    step form; lsh.py's paper form is the strictly causal one.)"""
    m, _, _ = make_op("mha", "chunk", d=32, causal=True, heads=4, c=4, before=1, wrap=True)
    assert_no_leak(lambda x: m(x, None), n=22)
