"""HF interop: `from_hf` imports a config as a spec, `load_hf` loads HF weights into it.

For every family (GPT-2, LLaMA 1/2/3 with Llama 3's rope scaling, Mistral's sliding window, Gemma, Phi-3 with
its fused projections and partial rotary, BERT): the imported spec has the parameters of the HF model built from
the same config (meta device, two sizes each), and with HF's random weights loaded (HF models built from configs,
nothing downloaded) gives HF's logits at seq 7 and 64 in eval mode; the causal ones greedy-generate HF's 16
tokens. The same for the encoder-decoders T5 (v1.0 and v1.1) and BART. A config feature with no evodsl form is refused with the key's place in config.json; a checkpoint that
does not fit is refused with every missing, unexpected and mis-shaped tensor listed.
"""
from __future__ import annotations

import json

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.cli import main

import transformers  # noqa: E402 - a dev dependency: missing, these tests fail

TOL = 1e-4  # max |evodsl - HF| <= TOL * max |HF|, float32
V = 97
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # scaled within 64 positions

# name: (config class, model class, small config for logits and generate, {size name: config for counts})
FAMILIES = {
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             dict(vocab_size=V, n_positions=96, n_embd=64, n_layer=2, n_head=4),
             {"small": {}, "medium": dict(n_embd=1024, n_layer=24, n_head=16)}),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,  # LLaMA 1: no GQA, the default rotary
              dict(SMALL),
              {"7b": {}, "2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                       num_attention_heads=40)}),
    "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM,  # GQA and Llama 3.1's rope scaling
               dict(SMALL, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE, max_position_embeddings=128),
               {"3-8b": dict(vocab_size=128256, intermediate_size=14336, num_key_value_heads=8,
                             rope_parameters=dict(LLAMA3_ROPE, original_max_position_embeddings=8192)),
                "3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                               num_key_value_heads=8, tie_word_embeddings=True)}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,  # a window of 5 across 64 positions
                dict(SMALL, num_key_value_heads=2, head_dim=16, sliding_window=5),
                {"7b": {}, "small": dict(hidden_size=1024, num_hidden_layers=4, head_dim=64)}),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM,  # head_dim * heads != d, MQA, tied
              dict(SMALL, num_key_value_heads=1, head_dim=32),
              {"7b": {}, "2b": dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                                    num_attention_heads=8, num_key_value_heads=1)}),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM,  # fused qkv and gate_up, half the dims rotated
             dict(SMALL, num_key_value_heads=2, pad_token_id=0,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
             {"mini": {}, "medium": dict(hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
                                         num_attention_heads=40, num_key_value_heads=10)}),
    "bert": (transformers.BertConfig, transformers.BertModel,
             dict(SMALL, max_position_embeddings=96),
             {"base": {}, "large": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                        num_attention_heads=16)}),
}
CAUSAL = [f for f in FAMILIES if f != "bert"]
# encoder-decoders: T5 v1.0 (ReLU, tied and rescaled head) and v1.1 (gated GELU, d_kv * heads != d, a deeper
# decoder, no rescaling), BART (scaled embeddings, a decoder with other heads, width and depth)
T5_SMALL = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
                pad_token_id=0)
ENCDEC = {
    "t5": (transformers.T5Config, transformers.T5ForConditionalGeneration, dict(T5_SMALL),
           {"small": {}, "base": dict(d_model=768, d_ff=3072, num_layers=12, num_heads=12)}),
    "t5-v1.1": (transformers.T5Config, transformers.T5ForConditionalGeneration,
                dict(T5_SMALL, d_kv=16, num_decoder_layers=3, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
                {"small": dict(d_model=512, d_ff=1024, num_layers=8, num_heads=6, feed_forward_proj="gated-gelu",
                               tie_word_embeddings=False),
                 "large": dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16,
                               feed_forward_proj="gated-gelu", tie_word_embeddings=False)}),
    "bart": (transformers.BartConfig, transformers.BartForConditionalGeneration,
             dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                  decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=48, max_position_embeddings=80,
                  scale_embedding=True, forced_eos_token_id=None),
             {"base": dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                           decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072),
              "large": {}}),
}


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family, size", [(f, s) for f, row in {**FAMILIES, **ENCDEC}.items() for s in row[3]])
def test_parameter_count_equals_hf(family, size):
    config_cls, model_cls, _, sizes = {**FAMILIES, **ENCDEC}[family]
    config = config_cls(**sizes[size])
    with torch.device("meta"):
        hf = model_cls(config)
    ours = evodsl.compile(evodsl.from_hf(config), device="meta")
    assert count(ours) == count(hf)


def pair(family: str, seed: int = 0, noise: float = 0.05, **changes):
    """An HF model from the small config with random weights (LayerNorm/RMSNorm gains and biases moved off their
    initial values), and the imported spec with those weights loaded."""
    config_cls, model_cls, small, _ = {**FAMILIES, **ENCDEC}[family]
    config = config_cls(**{**small, **changes})
    torch.manual_seed(seed)
    hf = model_cls(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * noise)
    ours = evodsl.compile(evodsl.from_hf(config))
    evodsl.load_hf(ours, hf.state_dict(), config)
    return hf, ours, config


@pytest.mark.parametrize("n", [7, 64])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_hf(family, n):
    hf, ours, _ = pair(family)
    ids = torch.randint(0, V, (2, n), generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        out = hf(ids)
        want = out.logits if family != "bert" else out.pooler_output
        got = ours(ids)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= TOL * want.abs().max()


@pytest.mark.parametrize("n, m", [(7, 5), (64, 64)])
@pytest.mark.parametrize("family", ENCDEC)
def test_encoder_decoder_logits_equal_hf(family, n, m):
    hf, ours, _ = pair(family)
    src = torch.randint(3, V, (2, n), generator=torch.Generator().manual_seed(n))
    tgt = torch.randint(3, V, (2, m), generator=torch.Generator().manual_seed(m + 1))
    with torch.no_grad():
        want, got = hf(input_ids=src, decoder_input_ids=tgt).logits, ours(src, tgt)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= TOL * want.abs().max()


@pytest.mark.parametrize("family", ENCDEC)
def test_encoder_decoder_greedy_generate_equals_hf(family):
    # HF's generate sizes T5's cache by num_layers: a deeper decoder fails inside HF (transformers 5.25)
    hf, ours, config = pair(family, noise=0.5, **({"num_decoder_layers": 2} if family == "t5-v1.1" else {}))
    src = torch.randint(3, V, (2, 13), generator=torch.Generator().manual_seed(4))
    start = config.decoder_start_token_id
    with torch.no_grad():
        want = hf.generate(input_ids=src, attention_mask=torch.ones_like(src), max_new_tokens=16, min_new_tokens=16,
                           do_sample=False, num_beams=1, decoder_start_token_id=start, forced_bos_token_id=None,
                           forced_eos_token_id=None, no_repeat_ngram_size=0, repetition_penalty=1.0)
    assert torch.equal(ours.generate(src, max_new_tokens=16, decoder_start_token_id=start), want)


def test_halves_layout_is_what_makes_llama_load_unpermuted():
    """The control: the same weights in a spec rotating the paper's interleaved pairs give other logits."""
    hf, _, config = pair("llama3")
    other = evodsl.compile(evodsl.from_hf(config).replace("pairs=halves", "pairs=interleaved"))
    evodsl.load_hf(other, hf.state_dict(), config)
    ids = torch.randint(0, V, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = hf(ids).logits, other(ids)
    assert (got - want).abs().max() > 100 * TOL * want.abs().max()


@pytest.mark.parametrize("family", CAUSAL)
def test_greedy_generate_equals_hf(family):
    hf, ours, _ = pair(family, seed=2)
    prompt = torch.randint(1, V, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, min_new_tokens=16,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours.generate(prompt, max_new_tokens=16), want)


def test_spec_is_readable_and_names_its_source(tmp_path):
    config = transformers.MistralConfig(**FAMILIES["mistral"][2])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()), encoding="utf-8")
    out = tmp_path / "mistral.evo"
    assert main(["from-hf", str(path), "-o", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# Imported by `evodsl from-hf` from a Hugging Face 'mistral' config (")
    assert "transformers.MistralForCausalLM" in text and str(path) in text
    for line in ("vocab    = 97", "kv_heads = 2", "layers   = 2", "eps      = 1e-06",
                 "mha(local, window=5, bias=false)", "pos(rope, base=10000, pairs=halves)", "head(lm, tied=false)"):
        assert line in text
    assert "head_dim" not in text  # d_model / heads, as mha's default
    assert "head_dim = 32" in evodsl.from_hf(transformers.GemmaConfig(**FAMILIES["gemma"][2]))
    assert evodsl.parse(out).name == "mistral"


def _config_file(tmp_path, data: dict):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def test_unsupported_rope_scaling_is_refused_at_its_key(tmp_path, capsys):
    data = dict(SMALL, model_type="llama", rope_theta=10000.0, rope_scaling={"rope_type": "longrope", "factor": 4.0})
    path = _config_file(tmp_path, data)
    out = tmp_path / "never.evo"
    assert main(["from-hf", str(path), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    line = next(i for i, s in enumerate(path.read_text().split("\n"), 1) if '"rope_type"' in s)
    assert f"{path}:{line}:" in err and "error[E415]: rope scaling 'longrope' has no pos(rope) form" in err
    assert '^^^^^^^^^^^' in err and "help: pos(rope) has scaling=linear, llama3, dynamic_ntk" in err
    assert not out.exists()


@pytest.mark.parametrize("data, key, message", [
    ({"model_type": "xlnet"}, "model_type", "no importer for model_type 'xlnet'"),
    (dict(SMALL, model_type="llama", hidden_act="tanh"), "hidden_act", "activation 'tanh' has no gated FFN"),
    (dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=V, n_positions=32,
          scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx", "has no evodsl form"),
    (dict(SMALL, model_type="bert", position_embedding_type="relative_key"), "position_embedding_type",
     "'relative_key' position scores"),
    (dict(model_type="llama", vocab_size=V), "hidden_size", "the config has no 'hidden_size'"),
])
def test_features_without_an_op_are_refused(tmp_path, data, key, message):
    path = _config_file(tmp_path, data)
    with pytest.raises(EvoError) as err:
        evodsl.from_hf(path)
    assert err.value.codes[0] == "E415" and message in str(err.value)
    if key in data:  # the caret under the key in config.json (a missing key has no place)
        assert any(f'"{key}"' in d.render(err.value.source) and "^" in d.render(err.value.source)
                   for d in err.value.diagnostics if d.span)


def test_mismatched_checkpoint_lists_every_problem():
    hf, ours, config = pair("llama")
    state = dict(hf.state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.rotary_extra"] = torch.zeros(3)
    state["model.norm.weight"] = torch.zeros(65)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(EvoError) as err:
        evodsl.load_hf(ours, state, config)
    text = str(err.value)
    assert err.value.codes == ["E416"] * 3
    assert "1 tensors missing from the checkpoint: model.layers.1.mlp.up_proj.weight" in text
    assert "1 checkpoint tensors nothing reads: model.layers.0.self_attn.rotary_extra" in text
    assert "model.norm.weight [65] for norm.weight [64]" in text
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items()), "nothing written on failure"


def test_checkpoint_folder_loads_with_one_command(tmp_path, capsys):
    """save_pretrained writes config.json and model.safetensors; `compile SPEC --weights FOLDER -o` loads them,
    and the artifact it writes gives HF's logits."""
    hf, _, config = pair("gemma")
    hf.save_pretrained(tmp_path / "ckpt")
    spec = tmp_path / "gemma.evo"
    assert main(["from-hf", str(tmp_path / "ckpt"), "-o", str(spec)]) == 0
    assert main(["compile", str(spec), "--weights", str(tmp_path / "ckpt"), "-o", str(tmp_path / "g.pt")]) == 0
    assert f"weights {tmp_path / 'ckpt'}" in capsys.readouterr().out
    ids = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, got = hf(ids).logits, evodsl.load(tmp_path / "g.pt")(ids)
    assert (got - want).abs().max() <= TOL * want.abs().max()


def test_weights_folder_without_config_is_refused(tmp_path, capsys):
    hf, _, config = pair("gpt2")
    hf.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").unlink()
    spec = tmp_path / "gpt2.evo"
    spec.write_text(evodsl.from_hf(config), encoding="utf-8")
    assert main(["compile", str(spec), "--weights", str(tmp_path / "ckpt")]) == 1
    assert "error[E401]: no config.json beside the weights" in capsys.readouterr().err


@pytest.mark.parametrize("family, rename", [
    ("gpt2", lambda k: k.removeprefix("transformer.")),  # saved from GPT2Model, as the hub's gpt2 checkpoint
    ("bert", lambda k: "bert." + k),  # BertModel's tensors inside a task model's checkpoint
])
def test_checkpoint_names_with_or_without_the_wrapper_prefix_load(family, rename):
    hf, ours, config = pair(family)
    state = {rename(k): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    other = evodsl.compile(evodsl.from_hf(config), seed=9)
    evodsl.load_hf(other, state, config)
    for (name, a), (_, b) in zip(ours.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name


def test_nonzero_logits_bias_is_refused():
    """BART's final_logits_bias is a zero buffer the imported head does not have: a checkpoint where it is not
    zero would load as another model."""
    hf, ours, config = pair("bart")
    state = dict(hf.state_dict())
    state["final_logits_bias"] = torch.full_like(state["final_logits_bias"], 0.5)
    with pytest.raises(EvoError, match="final_logits_bias is not zero"):
        evodsl.load_hf(ours, state, config)
