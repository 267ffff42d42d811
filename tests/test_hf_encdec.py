"""Encoder-decoders against Hugging Face, built from config objects only (nothing is downloaded): parameter
counts of specs/transformer.evo (Marian), t5_small.evo and bart_base.evo on the meta device, and for T5 and BART
the architecture itself: a small configuration of the spec (its bindings overridden, every architecture line as
written), loaded with HF's random weights, gives HF's logits, on a plain and on a padded batch."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import evodsl

import transformers  # noqa: E402 - a dev dependency: missing, these tests fail

SPECS = Path(__file__).resolve().parents[1] / "specs"
TOL = 1e-4  # max |evodsl - HF| <= TOL * max |HF|, float32


def count(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def hf_meta(cls, config):
    with torch.device("meta"):
        return cls(config)


def test_transformer_parameter_count_as_marian():
    config = transformers.MarianConfig(vocab_size=37000, d_model=512, encoder_layers=6, decoder_layers=6,
                                       encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048,
                                       decoder_ffn_dim=2048, share_encoder_decoder_embeddings=True,
                                       scale_embedding=True, pad_token_id=0, decoder_start_token_id=0)
    hf = hf_meta(transformers.MarianMTModel, config)
    ours = count(evodsl.compile(SPECS / "transformer.evo", device="meta"))
    assert count(hf) == 64_131_072
    frozen = count(hf) - count(hf, trainable_only=True)  # Marian's two sinusoid tables, parameters there
    assert frozen == 2 * config.max_position_embeddings * 512
    assert ours == count(hf, trainable_only=True) == 63_082_496


def test_t5_small_parameter_count():
    hf = hf_meta(transformers.T5ForConditionalGeneration, transformers.T5Config())
    assert count(evodsl.compile(SPECS / "t5_small.evo", device="meta")) == count(hf) == 60_506_624


def test_bart_base_parameter_count():
    config = transformers.BartConfig(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                                     decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072)
    hf = hf_meta(transformers.BartForConditionalGeneration, config)
    assert count(evodsl.compile(SPECS / "bart_base.evo", device="meta")) == count(hf) == 139_420_416


# ---------------------------------------------------------------- logits from the same weights

V, D, H, FF, L = 101, 32, 4, 64, 2


def t5_pair(noise: float = 0.05):
    config = transformers.T5Config(vocab_size=V, d_model=D, d_kv=D // H, d_ff=FF, num_layers=L,
                                   num_decoder_layers=L, num_heads=H, relative_attention_num_buckets=32,
                                   relative_attention_max_distance=128, dropout_rate=0.0, feed_forward_proj="relu",
                                   tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():  # away from HF's initialisation (its norms start at 1)
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * noise)
    ours = evodsl.compile(SPECS / "t5_small.evo", overrides=dict(vocab=V, d_model=D, heads=H, d_ff=FF, layers=L))
    evodsl.load_hf(ours, hf.state_dict(), config)  # the hand-written spec has the imported one's names
    return hf, ours


def bart_pair(noise: float = 0.05):
    config = transformers.BartConfig(vocab_size=V, d_model=D, encoder_layers=L, decoder_layers=L,
                                     encoder_attention_heads=H, decoder_attention_heads=H, encoder_ffn_dim=FF,
                                     decoder_ffn_dim=FF, max_position_embeddings=80, dropout=0.0,
                                     pad_token_id=1, bos_token_id=0, eos_token_id=V - 1, decoder_start_token_id=2,
                                     forced_eos_token_id=None)
    torch.manual_seed(0)
    hf = transformers.BartForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * noise)
    ours = evodsl.compile(SPECS / "bart_base.evo",
                          overrides=dict(vocab=V, d_model=D, heads=H, d_ff=FF, layers=L, n_ctx=80))
    evodsl.load_hf(ours, hf.state_dict(), config)  # final_logits_bias, a zero buffer, is checked to be zero
    return hf, ours


PAIRS = {"t5": t5_pair, "bart": bart_pair}


@pytest.fixture(scope="module", params=sorted(PAIRS))
def pair(request):
    return PAIRS[request.param]()


def _ids(b, n, seed):
    return torch.randint(3, V, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n,m", [(7, 5), (64, 64), (40, 11)])
def test_logits_match_hf_with_copied_weights(pair, n, m):
    hf, ours = pair
    src, tgt = _ids(2, n, n), _ids(2, m, m + 1)
    with torch.no_grad():
        want = hf(input_ids=src, decoder_input_ids=tgt).logits
        got = ours(src, tgt)
    assert got.shape == want.shape == (2, m, V)
    assert (got - want).abs().max().item() <= TOL * want.abs().max().item()


def test_padded_batch_matches_hf_masks(pair):
    """Right-padded source and target: at every real target position, HF's logits with both masks."""
    hf, ours = pair
    n, m = 23, 17
    src, tgt = _ids(3, n, 5), _ids(3, m, 6)
    src_mask = (torch.arange(n)[None] < torch.tensor([[23], [9], [14]])).long()
    tgt_mask = (torch.arange(m)[None] < torch.tensor([[17], [12], [4]])).long()
    with torch.no_grad():
        want = hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt,
                  decoder_attention_mask=tgt_mask).logits
        got = ours(src, tgt, attention_mask=src_mask, decoder_attention_mask=tgt_mask)
        unmasked = ours(src, tgt)
    real = tgt_mask.bool()
    assert (got[real] - want[real]).abs().max().item() <= TOL * want[real].abs().max().item()
    assert (unmasked[1] - got[1]).abs().max().item() > 1e-3  # the source mask changed what row 1 reads


@pytest.mark.parametrize("name,start", [("t5", 0), ("bart", 2), ("bart", 7)])
def test_greedy_generate_matches_hf(name, start):
    """16 greedy target tokens from the same source and weights: ours (the encoder once, cross-attention K/V
    kept, self-attention K/V growing) and HF's generate with its cache."""
    hf, ours = PAIRS[name](noise=0.5)  # weights far from initialisation: the tokens vary
    src = _ids(2, 13, 4)
    with torch.no_grad():
        want = hf.generate(input_ids=src, attention_mask=torch.ones_like(src), max_new_tokens=16, min_new_tokens=16,
                           do_sample=False, num_beams=1, decoder_start_token_id=start, forced_bos_token_id=None,
                           forced_eos_token_id=None, no_repeat_ngram_size=0, repetition_penalty=1.0)
    got = ours.generate(src, max_new_tokens=16, decoder_start_token_id=start)
    assert torch.equal(got, want)  # (random small models repeat themselves; test_decode.py checks decoding on
    # random targets, position by position)
