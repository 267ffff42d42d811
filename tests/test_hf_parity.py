"""Parity with Hugging Face reference implementations, built from config objects only (nothing is downloaded).

Parameter counts of the GPT-2, BERT, LLaMA-7B and FNet specs equal those of the HF models of the same
configuration (all built on the meta device, so no weights are allocated). For GPT-2 the architecture itself is
checked: a tiny configuration of the spec, loaded with HF's weights, gives HF's logits.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import evodsl

import transformers  # noqa: E402 - a dev dependency: missing, these tests fail

SPECS = Path(__file__).resolve().parents[1] / "specs"


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def hf_meta(cls, config):
    with torch.device("meta"):
        return cls(config)


def evo_meta(name: str):
    return evodsl.compile(SPECS / f"{name}.evo", device="meta")


def test_gpt2_parameter_count():
    hf = hf_meta(transformers.GPT2LMHeadModel, transformers.GPT2Config())
    assert count(evo_meta("gpt2")) == count(hf) == 124_439_808


def test_bert_parameter_count():
    hf = hf_meta(transformers.BertModel, transformers.BertConfig())
    assert count(evo_meta("bert")) == count(hf) == 109_482_240


def test_llama_7b_parameter_count():
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                      rms_norm_eps=1e-6, tie_word_embeddings=False)
    hf = hf_meta(transformers.LlamaForCausalLM, config)
    assert count(evo_meta("llama")) == count(hf) == 6_738_415_616


def test_llama2_70b_gqa_parameter_count():
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                                      num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    hf = hf_meta(transformers.LlamaForCausalLM, config)
    assert count(evo_meta("llama2_70b")) == count(hf) == 68_976_648_192


def test_fnet_parameter_count():
    hf = hf_meta(transformers.FNetModel, transformers.FNetConfig())
    assert count(evo_meta("fnet")) == count(hf) == 82_861_056


# ---------------------------------------------------------------- GPT-2: same logits from the same weights

TINY = dict(vocab=97, n_ctx=32, d_model=64, heads=4, layers=2)


def tiny_gpt2_spec() -> str:
    """specs/gpt2.evo with its hyperparameter bindings made small; every architecture line is kept as written."""
    text = (SPECS / "gpt2.evo").read_text(encoding="utf-8")
    for name, value in TINY.items():
        text, n = re.subn(rf"^{name}\s*=.*$", f"{name} = {value}", text, flags=re.M)
        assert n == 1, f"gpt2.evo has no binding line for {name}"
    return text


def test_gpt2_logits_match_hf_with_copied_weights():
    config = transformers.GPT2Config(vocab_size=TINY["vocab"], n_positions=TINY["n_ctx"], n_embd=TINY["d_model"],
                                     n_head=TINY["heads"], n_layer=TINY["layers"], bos_token_id=0,
                                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # move LayerNorm and bias values away from their 1 / 0 initialisation
        for name, p in hf.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    evo = evodsl.compile(tiny_gpt2_spec())
    evodsl.load_hf(evo, hf.state_dict(), config)  # fills every evodsl tensor, or says which it cannot
    assert count(evo) == count(hf)
    assert evo.head.weight is evo.embed.weight, "the LM head stays tied to the embedding"

    ids = torch.randint(0, TINY["vocab"], (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
        got = evo(ids)
    assert got.shape == want.shape == (2, 16, TINY["vocab"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_gpt2_padded_batch_matches_hf_attention_mask():
    """HF's attention_mask, right padding: the real positions' logits equal HF GPT-2's with the same mask."""
    config = transformers.GPT2Config(vocab_size=TINY["vocab"], n_positions=TINY["n_ctx"], n_embd=TINY["d_model"],
                                     n_head=TINY["heads"], n_layer=TINY["layers"], resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(1)
    hf = transformers.GPT2LMHeadModel(config).eval()
    evo = evodsl.compile(tiny_gpt2_spec())
    evodsl.load_hf(evo, hf.state_dict(), config)
    ids = torch.randint(0, TINY["vocab"], (3, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, 9:], mask[2, 4:] = 0, 0
    with torch.no_grad():
        want, got = hf(ids, attention_mask=mask).logits, evo(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)


def test_gpt2_greedy_generate_matches_hf():
    """HF GPT-2 with its KV cache and ours with its decoding state, the same weights: 16 greedy tokens alike."""
    config = transformers.GPT2Config(vocab_size=TINY["vocab"], n_positions=TINY["n_ctx"], n_embd=TINY["d_model"],
                                     n_head=TINY["heads"], n_layer=TINY["layers"], resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=None,
                                     pad_token_id=0)
    torch.manual_seed(2)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    evo = evodsl.compile(tiny_gpt2_spec())
    evodsl.load_hf(evo, hf.state_dict(), config)
    prompt = torch.randint(0, TINY["vocab"], (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                           min_new_tokens=16)
    got = evo.generate(prompt, max_new_tokens=16)
    assert torch.equal(got, want)


# ---------------------------------------------------------------- Nyströmformer: parameters, and the last hidden state

def test_nystromformer_parameter_count():
    hf = hf_meta(transformers.NystromformerModel, transformers.NystromformerConfig())
    assert count(evo_meta("nystromformer")) == count(hf) == 108_500_112


NYSTROM_TINY = dict(vocab=97, n_ctx=62, d_model=64, heads=4, d_ff=128, layers=2, landmarks=8, conv=5)


def tiny_spec(name: str, values: dict) -> str:
    """specs/<name>.evo with its hyperparameter bindings made small; every architecture line is kept as written."""
    text = (SPECS / f"{name}.evo").read_text(encoding="utf-8")
    for key, value in values.items():
        text, n = re.subn(rf"^{key}\s*=.*$", f"{key} = {value}", text, flags=re.M)
        assert n == 1, f"{name}.evo has no binding line for {key}"
    return text


def nystromformer_weights_to_evodsl(hf_state: dict, layers: int) -> dict:
    """NystromformerModel's state_dict under the evodsl names (its position table is copied whole: both read
    position t at row t + 2)."""
    out = {"embed.weight": hf_state["embeddings.word_embeddings.weight"],
           "embed.segment.weight": hf_state["embeddings.token_type_embeddings.weight"],
           "pos.weight": hf_state["embeddings.position_embeddings.weight"],
           "norm.weight": hf_state["embeddings.LayerNorm.weight"], "norm.bias": hf_state["embeddings.LayerNorm.bias"]}
    names = {"attn.q_proj": "attention.self.query", "attn.k_proj": "attention.self.key",
             "attn.v_proj": "attention.self.value", "attn.o_proj": "attention.output.dense",
             "norm1": "attention.output.LayerNorm", "ffn.up_proj": "intermediate.dense",
             "ffn.down_proj": "output.dense", "norm2": "output.LayerNorm"}
    for i in range(layers):
        h, e = f"encoder.layer.{i}.", f"blocks.{i}."
        out[e + "attn.conv"] = hf_state[h + "attention.self.conv.weight"]
        for ours, theirs in names.items():
            out[e + ours + ".weight"] = hf_state[h + theirs + ".weight"]
            out[e + ours + ".bias"] = hf_state[h + theirs + ".bias"]
    return out


@pytest.mark.parametrize("n", [32, 8], ids=["nystrom-path", "exact-path"])
def test_nystromformer_last_hidden_state_matches_hf_with_copied_weights(n):
    """HF takes the Nyström path when num_landmarks < segment_means_seq_len = n (n = 32, 8 landmarks: segments of
    4), and exact softmax attention when they are equal (n = 8), as the spec's mha(nystrom) does at n <= landmarks.
    HF scales Z_0 by one largest column sum over the whole batch (coupling its sequences); the spec's
    pinv_init=sequence takes it over each sequence's heads, so a batch of two equals HF run on each alone."""
    t = NYSTROM_TINY
    config = transformers.NystromformerConfig(
        vocab_size=t["vocab"], hidden_size=t["d_model"], num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
        intermediate_size=t["d_ff"], max_position_embeddings=t["n_ctx"], num_landmarks=t["landmarks"],
        segment_means_seq_len=n, conv_kernel_size=t["conv"], hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    torch.manual_seed(4)
    hf = transformers.NystromformerModel(config).eval()
    with torch.no_grad():  # move LayerNorm and bias values away from their 1 / 0 initialisation; queries and keys
        for name, p in hf.named_parameters():  # 10x: with HF's 0.02 init every weight in a row is alike, and
            if "self.query" in name or "self.key" in name:  # neither Z_0's scale nor the landmarks would show
                p.mul_(10.0)
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    evo = evodsl.compile(tiny_spec("nystromformer", t)).eval()
    mapped = nystromformer_weights_to_evodsl(hf.state_dict(), t["layers"])
    assert set(mapped) == set(evo.state_dict()), "the name mapping covers exactly the evodsl weights"
    evo.load_state_dict(mapped, strict=True)
    assert count(evo) == count(hf)

    ids = torch.randint(0, t["vocab"], (2, n), generator=torch.Generator().manual_seed(5))
    types = torch.randint(0, 2, (2, n), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = torch.cat([hf(ids[i:i + 1], token_type_ids=types[i:i + 1]).last_hidden_state for i in range(2)])
        got = evo(ids, token_type_ids=types)
    assert got.shape == want.shape == (2, n, t["d_model"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    if n > t["landmarks"]:  # HF on the batch of two: Z_0's scale read across both sequences changes them
        with torch.no_grad():
            coupled = hf(ids, token_type_ids=types).last_hidden_state
        assert (coupled - want).abs().max().item() > 1e-3
# ---------------------------------------------------------------- Longformer: local + global attention, as HF's

def test_longformer_parameter_count():
    hf = hf_meta(transformers.LongformerModel, transformers.LongformerConfig())
    assert count(evo_meta("longformer_base")) == count(hf) == 130_743_552


# Both run in float64, but HF's LongformerSelfAttention takes its softmax in float32 (dtype=torch.float32, then
# back): outputs of order 1 agree to ~1e-10, not to float64's 1e-15.
HF_SOFTMAX_TOL = 1e-8
LONGFORMER_TINY = dict(vocab=97, n_ctx=64, d_model=32, heads=4, d_ff=64, layers=2, window=8)


def tiny_longformer_spec() -> str:
    return tiny_spec("longformer_base", LONGFORMER_TINY)


def longformer_weights_to_evodsl(hf_state: dict, layers: int) -> dict:
    """LongformerModel's state_dict under the evodsl names. The position table is copied whole: the spec reads it
    at offset 2, as HF (RoBERTa's position ids start at padding_idx + 1 = 2), so HF's row p + 2 serves position
    p in both."""
    out = {"embed.weight": hf_state["embeddings.word_embeddings.weight"],
           "embed.segment.weight": hf_state["embeddings.token_type_embeddings.weight"],
           "pos.weight": hf_state["embeddings.position_embeddings.weight"],
           "norm.weight": hf_state["embeddings.LayerNorm.weight"], "norm.bias": hf_state["embeddings.LayerNorm.bias"],
           "head.dense.weight": hf_state["pooler.dense.weight"], "head.dense.bias": hf_state["pooler.dense.bias"]}
    names = {"attention.self.query": "attn.q_proj", "attention.self.key": "attn.k_proj",
             "attention.self.value": "attn.v_proj", "attention.self.query_global": "attn.query_global",
             "attention.self.key_global": "attn.key_global", "attention.self.value_global": "attn.value_global",
             "attention.output.dense": "attn.o_proj", "attention.output.LayerNorm": "norm1",
             "intermediate.dense": "ffn.up_proj", "output.dense": "ffn.down_proj", "output.LayerNorm": "norm2"}
    for i in range(layers):
        for hf_name, evo_name in names.items():
            for leaf in ("weight", "bias"):
                out[f"blocks.{i}.{evo_name}.{leaf}"] = hf_state[f"encoder.layer.{i}.{hf_name}.{leaf}"]
    return out


def tiny_longformer_pair(seed: int):
    t = LONGFORMER_TINY
    config = transformers.LongformerConfig(vocab_size=t["vocab"], max_position_embeddings=t["n_ctx"] + 2,
                                           hidden_size=t["d_model"], num_attention_heads=t["heads"],
                                           intermediate_size=t["d_ff"], num_hidden_layers=t["layers"],
                                           attention_window=t["window"], hidden_dropout_prob=0.0,
                                           attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    hf = transformers.LongformerModel(config).double().eval()
    with torch.no_grad():  # LayerNorm and bias values away from their 1 / 0 initialisation
        for name, p in hf.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    evo = evodsl.compile(tiny_longformer_spec(), dtype=torch.float64).eval()
    mapped = longformer_weights_to_evodsl(hf.state_dict(), t["layers"])
    assert set(mapped) == set(evo.state_dict()), "the name mapping covers exactly the evodsl weights"
    evo.load_state_dict(mapped, strict=True)
    assert count(evo) == count(hf)
    return hf, evo


def _longformer_ids(b: int, n: int, seed: int) -> torch.Tensor:
    """Token ids other than HF's pad id 1 (whose position id would be the padding row)."""
    return torch.randint(2, LONGFORMER_TINY["vocab"], (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n", [24, 21], ids=["three-windows", "padded-by-hf"])
def test_longformer_matches_hf_with_copied_weights(n):
    """The tiny spec with HF's random weights: HF's hidden states and pooled output, the first token global
    (global_attention_mask). n = 24 is three of HF's attention_window (8); at n = 21 HF pads to 24 internally."""
    hf, evo = tiny_longformer_pair(seed=0)
    ids = _longformer_ids(2, n, seed=n)
    glob = torch.zeros_like(ids)
    glob[:, 0] = 1
    types = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(1))
    seen = []
    hook = evo.head.register_forward_hook(lambda mod, args, out: seen.append(args[0]))  # the pooler's input
    with torch.no_grad():
        want = hf(ids, global_attention_mask=glob, token_type_ids=types)
        pooled = evo(ids, token_type_ids=types)
    hook.remove()
    torch.testing.assert_close(seen[0], want.last_hidden_state, rtol=0, atol=HF_SOFTMAX_TOL)
    torch.testing.assert_close(pooled, want.pooler_output, rtol=0, atol=HF_SOFTMAX_TOL)
    with torch.no_grad():  # the control: without its global token HF gives other numbers
        local_only = hf(ids, token_type_ids=types).pooler_output
    assert (local_only - pooled).abs().max() > 1e-3


def test_longformer_padded_batch_matches_hf():
    """Right padding (HF's attention_mask): the pooled output of every sequence equals HF's."""
    hf, evo = tiny_longformer_pair(seed=1)
    ids = _longformer_ids(3, 24, seed=5)
    mask = (torch.arange(24)[None, :] < torch.tensor([[24], [13], [5]])).long()
    glob = torch.zeros_like(ids)
    glob[:, 0] = 1
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, global_attention_mask=glob).pooler_output
        got = evo(ids, attention_mask=mask)
    torch.testing.assert_close(got, want, rtol=0, atol=HF_SOFTMAX_TOL)


# ---------------------------------------------------------------- BigBird: block-sparse attention (ITC), as HF's

def test_bigbird_parameter_count():
    hf = hf_meta(transformers.BigBirdModel, transformers.BigBirdConfig())
    assert count(evo_meta("bigbird_base")) == count(hf) == 127_468_800


# 16 blocks of 4: more than HF's (5 + 2 r) blocks, below which it falls back to full attention
BIGBIRD_TINY = dict(vocab=97, n_ctx=64, d_model=32, heads=4, d_ff=64, layers=2, bblock=4, rblocks=3, p_drop=0.0)


def bigbird_weights_to_evodsl(hf_state: dict, layers: int) -> dict:
    """BigBirdModel's state_dict under the evodsl names (positions from 0: the tables are the same)."""
    out = {"embed.weight": hf_state["embeddings.word_embeddings.weight"],
           "embed.segment.weight": hf_state["embeddings.token_type_embeddings.weight"],
           "pos.weight": hf_state["embeddings.position_embeddings.weight"],
           "norm.weight": hf_state["embeddings.LayerNorm.weight"], "norm.bias": hf_state["embeddings.LayerNorm.bias"],
           "head.dense.weight": hf_state["pooler.weight"], "head.dense.bias": hf_state["pooler.bias"]}
    names = {"attn.q_proj": "attention.self.query", "attn.k_proj": "attention.self.key",
             "attn.v_proj": "attention.self.value", "attn.o_proj": "attention.output.dense",
             "norm1": "attention.output.LayerNorm", "ffn.up_proj": "intermediate.dense",
             "ffn.down_proj": "output.dense", "norm2": "output.LayerNorm"}
    for i in range(layers):
        for ours, theirs in names.items():
            for leaf in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{leaf}"] = hf_state[f"encoder.layer.{i}.{theirs}.{leaf}"]
    return out


def tiny_bigbird_pair(seed: int):
    t = BIGBIRD_TINY
    config = transformers.BigBirdConfig(vocab_size=t["vocab"], max_position_embeddings=t["n_ctx"],
                                        hidden_size=t["d_model"], num_attention_heads=t["heads"],
                                        intermediate_size=t["d_ff"], num_hidden_layers=t["layers"],
                                        block_size=t["bblock"], num_random_blocks=t["rblocks"],
                                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    hf = transformers.BigBirdModel(config).double().eval()
    with torch.no_grad():  # LayerNorm and bias values away from their 1 / 0 initialisation
        for name, p in hf.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            if "self.query.weight" in name or "self.key.weight" in name:  # peaked weights: the pattern shows
                p.mul_(10.0)
    evo = evodsl.compile(tiny_spec("bigbird_base", t), dtype=torch.float64).eval()
    mapped = bigbird_weights_to_evodsl(hf.state_dict(), t["layers"])
    assert set(mapped) == set(evo.state_dict()), "the name mapping covers exactly the evodsl weights"
    evo.load_state_dict(mapped, strict=True)
    assert count(evo) == count(hf)
    return hf, evo


def _use_random_blocks(evo, tables: list) -> None:
    """Give layer i's attention HF's random blocks tables[i] ([h, nb - 2, r]) in place of its own draw."""
    for i, table in enumerate(tables):
        attn = evo.get_submodule(f"blocks.{i}.attn")
        attn.random_blocks = lambda nb, device, t=table: (t.to(device), torch.ones_like(t, dtype=torch.bool))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_bigbird_matches_hf_with_its_random_blocks(mode):
    """The tiny spec with HF's weights and HF's random blocks gives HF's hidden states and pooled output. In eval
    mode HF's random blocks are all block 0 (_bigbird_block_rand_mask_with_head returns zeros: block 0 counted
    r + 1 times); in training (dropout 0) HF seeds np.random with the layer index and draws distinct blocks per
    head outside the window and the globals, recorded here. Both are deterministic; the op computes either
    table's attention exactly. Its own seeded draw differs from both (the control)."""
    hf, evo = tiny_bigbird_pair(seed=0)
    t, n = BIGBIRD_TINY, 64
    ids = torch.randint(1, t["vocab"], (2, n), generator=torch.Generator().manual_seed(3))
    types = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(4))
    drawn = []
    layers = [hf.encoder.layer[i].attention.self for i in range(t["layers"])]
    for layer in layers:
        original = layer._bigbird_block_rand_mask_with_head
        layer._bigbird_block_rand_mask_with_head = (
            lambda *a, f=original, **k: drawn.append(torch.tensor(np.stack(f(*a, **k)), dtype=torch.long))
            or drawn[-1].numpy())
    if mode == "train":
        hf.train()
    seen = []
    hook = evo.head.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    with torch.no_grad():
        want = hf(ids, token_type_ids=types)
        evo(ids, token_type_ids=types)  # the op's own draw (seen[0])
        assert len(drawn) == t["layers"] and all(d.shape == (t["heads"], n // t["bblock"] - 2, t["rblocks"])
                                                 for d in drawn)
        assert all((d == 0).all() for d in drawn) == (mode == "eval")
        _use_random_blocks(evo, drawn)
        pooled = evo(ids, token_type_ids=types)
    hook.remove()
    torch.testing.assert_close(seen[1], want.last_hidden_state, rtol=0, atol=1e-10)
    torch.testing.assert_close(pooled, want.pooler_output, rtol=0, atol=1e-10)
    assert (seen[0] - seen[1]).abs().max() > 1e-2  # the op's own draw is another pattern
