"""Decoding: a prefill of any length, then chunks or single tokens, gives the full forward's logits at every
position (float64, 1e-10 relative); the live state holds exactly `evodsl cost`'s kv_cache bytes; generate is
the argmax (or a reproducible sample) of that; a model with an op that has no step form is refused up front,
and generates with use_cache=False (the whole sequence again at every token)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import evodsl
from evodsl import EvoError
from spechelpers import SPECS, output_causal, small

DECODABLE = [p for p in SPECS if output_causal(evodsl.parse(p)) and len(evodsl.parse(p).inputs) == 1
             and evodsl.compile(p, device="meta").decodable() is None]
SEQ2SEQ = [p for p in SPECS if len(evodsl.parse(p).inputs) == 2]
ROOT = Path(__file__).resolve().parents[1]


def _chunks(total: int, g: torch.Generator) -> list[int]:
    """Random pieces of a sequence: a prompt of any length, then chunks of 1 to 5 tokens."""
    sizes, left = [], total
    first = int(torch.randint(1, total, (1,), generator=g))
    sizes.append(first)
    left -= first
    while left:
        k = min(left, int(torch.randint(1, 6, (1,), generator=g)))
        sizes.append(k)
        left -= k
    return sizes


def _check_decode_equals_forward(model, ids, g, rtol=1e-10):
    with torch.no_grad():
        full = model(ids)
        state, pieces, at = None, [], 0
        for k in _chunks(ids.shape[1], g):
            logits, state = model.decode(ids[:, at:at + k], state)
            pieces.append(logits)
            at += k
    got = torch.cat(pieces, dim=1)
    assert got.shape == full.shape
    err = (got - full).abs().max().item()
    assert err <= rtol * full.abs().max().item(), f"decoded logits differ from the forward's by {err}"
    return state


def test_every_causal_spec_with_step_forms_is_decoded():
    assert {p.stem for p in DECODABLE} >= {"gpt2", "llama", "llama2_70b", "vanilla", "memory_transformer",
                                           "linear_transformer", "adaptive_span"}


@pytest.mark.parametrize("spec", DECODABLE, ids=[p.stem for p in DECODABLE])
def test_decoding_equals_the_forward(spec):
    over = small(spec)
    model = evodsl.compile(spec, overrides=over, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    vocab = evodsl.parse(spec, over).input.params.vocab
    for trial in range(3):
        ids = torch.randint(0, vocab, (2, 37), generator=g)
        state = _check_decode_equals_forward(model, ids, g)
    # the live state holds what `evodsl cost` declares for this many tokens (float64: 8 bytes an element)
    declared = evodsl.cost(spec, seq=37, batch=2, overrides=over, dtype="float32")["memory"]["kv_cache"]
    assert state.nbytes() == declared * 2


@pytest.mark.parametrize("spec", SEQ2SEQ, ids=[p.stem for p in SEQ2SEQ])
def test_encoder_decoders_decode(spec):
    """The encoder runs once, at the first call; the target in random pieces then gives the full forward's
    logits; the state holds the decoder's K/V and every cross-attention's source K/V, as `evodsl cost` says
    (the encoder keeps none); generate is the argmax of the forward."""
    over = small(spec)
    model = evodsl.compile(spec, overrides=over, dtype=torch.float64)
    vocab = evodsl.parse(spec, over).input.params.vocab
    g = torch.Generator().manual_seed(5)
    src, tgt = torch.randint(0, vocab, (2, 23), generator=g), torch.randint(0, vocab, (2, 19), generator=g)
    with torch.no_grad():
        full = model(src, tgt)
        state, pieces, at = None, [], 0
        for k in _chunks(19, g):
            logits, state = model.decode(tgt[:, at:at + k], state, input_ids=src if state is None else None)
            pieces.append(logits)
            at += k
    got = torch.cat(pieces, dim=1)
    assert (got - full).abs().max().item() <= 1e-10 * full.abs().max().item()
    declared = evodsl.cost(spec, seq=23, decoder_seq=19, batch=2, overrides=over)["memory"]["kv_cache"]
    assert state.nbytes() == 2 * declared
    out = model.generate(src, max_new_tokens=6, decoder_start_token_id=3)
    ids = src.new_full((2, 1), 3)
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(src, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


ATTENTION = """
vocab = 53
d_model = 32
heads = 4
model m(causal=true) = input(tokens) -> embed(token) -> {pos}
    -> repeat({block}, 2) -> norm -> head(lm)
"""
POSITIONS = ["pos(rope)", "pos(rope, fraction=0.5)", "pos(alibi)", "pos(t5_bias, heads=4)", "pos(learned, max_len=64)",
             "pos(sinusoidal)", "pos(xpos, scale_base=16)", "pos(kerple)", "pos(kerple, kind=power)",
             "pos(none)", "pos(randomized, max_len=64)", "pos(randomized, max_len=64, scheme=learned)",
             "pos(randomized_rope, max_len=64)"]
SOFTMAX_ONLY = ("pos(t5", "pos(kerple", "pos(randomized_rope")  # on mha(softmax) only (its dense bias, its context)
BLOCKS = ["norm -> mha(softmax) -> norm -> ffn", "norm -> mha(softmax, kv_heads=2) -> norm -> ffn(swiglu)",
          "norm -> mha(softmax, kv_heads=1, head_dim=4, bias=false) -> norm -> ffn",
          "residual(mha(softmax), scores=true) -> norm -> residual(ffn) -> norm"]


# local attention across several windows (29 tokens, w = 5), and w past the sequence; linear attention
BANDED = ["norm -> mha(local, window=5) -> norm -> ffn", "norm -> mha(local, window=40, kv_heads=2) -> norm -> ffn",
          "norm -> mha(local, window=3, kv_heads=1, head_dim=4, bias=false) -> norm -> ffn",
          "norm -> mha(local, window=5, scale=0.3, kv_heads=2) -> norm -> ffn"]
# Longformer's causal form: keys t-2 .. t, and dilated (every third key back to t - 9), absolute positions only
LONGFORMER = ["norm -> mha(longformer, window=4) -> norm -> ffn",
              "norm -> mha(longformer, window=6, dilation=3, kv_heads=2) -> norm -> ffn"]
LINEAR = ["norm -> mha(linear) -> norm -> ffn", "norm -> mha(linear, kv_heads=2) -> norm -> ffn(swiglu)"]
# the right-product attentions without a denominator: no position scheme inside, so the stream's own
RIGHT_PRODUCT = ["norm -> mha(fanet) -> norm -> ffn", "norm -> mha(fanet, kv_heads=2, bias=false) -> norm -> ffn",
                 "norm -> mha(simpletron) -> norm -> ffn", "norm -> mha(simpletron, kv_heads=1) -> norm -> ffn"]
# random-feature attention: Performer's running key max (its state rescaled), RFA plain and gated
RANDOM_FEATURES = ["norm -> mha(performer, features=16) -> norm -> ffn",
                   "norm -> mha(performer, features=12, kv_heads=2) -> norm -> ffn(swiglu)",
                   "norm -> mha(rfa, features=8, kv_heads=2) -> norm -> ffn",
                   "norm -> mha(rfa, features=8, gate=true, kv_heads=2) -> norm -> ffn",
                   "norm -> mha(learned_kernel, components=2, features=6, kv_heads=2) -> norm -> ffn",
                   "norm -> mha(slim, features=12, chunk=8, kv_heads=2) -> norm -> ffn"]
# Momentum Transformer: the plain sums, the momentum and z, read by new tokens in pieces
MOMENTUM = ["norm -> mha(momentum) -> norm -> ffn", "norm -> mha(momentum, beta=0.9, gamma=0.5, kv_heads=2) -> norm -> ffn"]
# Flowformer: the flows' running sums and the competition-weighted state
FLOWFORMER = ["norm -> mha(flowformer) -> norm -> ffn", "norm -> mha(flowformer, kv_heads=2) -> norm -> ffn"]
# the Attention Free Transformer: running sums (simple), the K/V cache (full, local, conv, daft)
AFT = ["norm -> mixer(aft) -> norm -> ffn", "norm -> mixer(aft, mode=full, max_len=64) -> norm -> ffn",
       "norm -> mixer(aft, mode=local, max_len=64, window=4) -> norm -> ffn",
       "norm -> mixer(aft, mode=conv, kernel=3, heads=2) -> norm -> ffn", "norm -> mixer(daft, max_len=64, rank=4)"]
# chunks of 5 across the 29 tokens (the cache: the unfinished chunk), one chunk past the sequence
CHUNK = ["norm -> mha(chunk, c=5) -> norm -> ffn", "norm -> mha(chunk, c=40, kv_heads=2) -> norm -> ffn",
         "norm -> mha(chunk, c=3, kv_heads=1, head_dim=4, bias=false) -> norm -> ffn"]
# FMMformer: the band's last w keys and values beside each feature map's running sums
FMM = ["norm -> mha(fmm, w=5) -> norm -> ffn", "norm -> mha(fmm, w=40, kv_heads=2, kernels=3) -> norm -> ffn",
       "norm -> mha(fmm, w=3, kv_heads=1, kernels=1, head_dim=4, bias=false) -> norm -> ffn"]
# causal Luna: its prefix sums continued from the state (the positions seen give t); chunks of 4 across the prefill
LUNA = ["norm -> mha(luna, l=5) -> norm -> ffn", "norm -> mha(luna, l=3, kv_heads=2, act=softplus, chunk=4) -> norm -> ffn"]
# BP-Transformer: spans of up to 16 tokens across the 29 (the cache: every key and value)
BPT = ["norm -> mha(bpt, k=2) -> norm -> ffn", "norm -> mha(bpt, k=1, kv_heads=2, rel_pos=false) -> norm -> ffn"]
# memory-compressed attention: the finished slots and the unfinished slot's raw tokens (29 tokens, k = 3 and 4), k past
# the sequence (raw tokens only)
MEMORY_COMPRESSED = ["norm -> mha(memory_compressed, k=3) -> norm -> ffn",
                     "norm -> mha(memory_compressed, k=4, kv_heads=2) -> norm -> ffn",
                     "norm -> mha(memory_compressed, k=40, kv_heads=1, head_dim=4, bias=false) -> norm -> ffn"]
# Transformer on a Diet: offsets reaching 16 back (the cache: the last max(O) + 1 positions), a cascade window
DILATED = ["norm -> mha(dilated, pattern=dilated_mem, layer=3) -> norm -> ffn",
           "norm -> mha(dilated, layer=2, k=4, kv_heads=2) -> norm -> ffn",
           "norm -> mha(dilated, pattern=cascade, layer=1, window=3, kv_heads=1, head_dim=4) -> norm -> ffn"]
# Combiner-Fixed: blocks of 3 and 4 (the cache: the finished blocks' summaries, the unfinished block's raw q, k, v),
# and a block longer than the prompt
COMBINER = ["norm -> mha(combiner, block=3) -> norm -> ffn", "norm -> mha(combiner, block=4, kv_heads=2) -> norm -> ffn",
            "norm -> mha(combiner, block=40, kv_heads=1, head_dim=4, bias=false) -> norm -> ffn",
            "norm -> mha(combiner, mode=axial, block=3) -> norm -> ffn",  # rows of 3 (the cache: keys and summaries)
            "norm -> mha(combiner, mode=axial, block=5, kv_heads=2) -> norm -> ffn",
            "norm -> mha(combiner, mode=logsparse) -> norm -> ffn",  # the cache: every q, k, v; spans pooled per token
            "norm -> mha(combiner, mode=logsparse, kv_heads=1, head_dim=4, bias=false) -> norm -> ffn"]
# H-Transformer-1D: levels of blocks of 2 .. 16 tokens across the 29 (the state: each level's last three blocks), a
# block past the sequence (level 0 alone)
HIERARCHICAL = ["norm -> mha(hierarchical, block=2) -> norm -> ffn",
                "norm -> mha(hierarchical, block=4, kv_heads=2) -> norm -> ffn",
                "norm -> mha(hierarchical, block=40, kv_heads=1, head_dim=4, bias=false) -> norm -> ffn"]
# the retina walk: windows of 2 and 3, pooled blocks up to 8 and 9 tokens (the cache: every key and value)
MULTISCALE = ["norm -> mha(multiscale, window=2, scales=3) -> norm -> ffn",
              "norm -> mha(multiscale, window=3, pool=3, kv_heads=2) -> norm -> ffn",
              "norm -> mha(multiscale, window=40, kv_heads=1, head_dim=4, bias=false) -> norm -> ffn"]
# FourierFormer: the cache of every key and value, the new tokens against it in blocks of 4 (29 tokens), a block past
# the sequence
FOURIER = ["norm -> mha(fourier_integral, R=0.5, block=4) -> norm -> ffn",
           "norm -> mha(fourier_integral, R=1.0, power=2, block=40, kv_heads=2) -> norm -> ffn",
           "norm -> mha(fourier_integral, block=3, kv_heads=1, head_dim=4, learn_R=false) -> norm -> ffn"]
# FoX: the K/V cache and D of every position (29 tokens), grouped and single K/V heads
FORGETTING = ["norm -> mha(forgetting) -> norm -> ffn", "norm -> mha(forgetting, kv_heads=2) -> norm -> ffn",
              "norm -> mha(forgetting, kv_heads=1, head_dim=4, bias=false) -> norm -> ffn",
              "norm -> mha(forgetting, pro=true, kv_heads=2) -> norm -> ffn"]
# MoBA: blocks of 3 and 4 over the 29 tokens (the cache: every key and value, the finished blocks' mean keys), k
# past the blocks
MOBA = ["norm -> mha(moba, block=3, topk=2) -> norm -> ffn", "norm -> mha(moba, block=4, topk=3, kv_heads=2) -> norm -> ffn",
        "norm -> mha(moba, block=5, topk=20, kv_heads=1, head_dim=4, bias=false) -> norm -> ffn"]
# NSA: compressed blocks completing across the chunks (l = 4, 6), selection blocks of 4 to 8, windows of 3 and 5, and a
# window past the sequence (the cache: every key and value, and the compressed blocks)
NSA = ["norm -> mha(nsa, block=4, stride=2, select_block=4, topk=3, window=5) -> norm -> ffn",
       "norm -> mha(nsa, block=4, stride=2, select_block=8, topk=3, window=3, kv_heads=2) -> norm -> ffn",
       "norm -> mha(nsa, block=6, stride=3, select_block=6, topk=4, window=40, kv_heads=1, head_dim=4, bias=false) -> norm -> ffn"]
# differential attention: the cache of both key halves and the 2 dh-wide values (GQA, head_dim set, a deep layer)
DIFFERENTIAL = ["norm -> mha(differential, heads=2) -> norm -> ffn",
                "norm -> mha(differential, heads=2, kv_heads=1, layer=6) -> norm -> ffn",
                "norm -> mha(differential, heads=4, kv_heads=2, head_dim=4, bias=false) -> norm -> ffn"]
# sigmoid attention: the K/V cache, the new tokens against it in blocks of 4 (29 tokens) or one block past the prompt
SIGMOID = ["norm -> mha(sigmoid, block=4) -> norm -> ffn", "norm -> mha(sigmoid, block=40, kv_heads=2, seq=64) -> norm -> ffn",
           "norm -> mha(sigmoid, block=3, kv_heads=1, head_dim=4, bias=false, score_bias=-1.5) -> norm -> ffn"]
# top-k: the K/V cache, each new token's top k over it (29 tokens; chunks of 4 over a prompt), k past the sequence
TOPK = ["norm -> mha(topk, k=3, chunk=4) -> norm -> ffn", "norm -> mha(topk, k=5, chunk=2, kv_heads=2) -> norm -> ffn",
        "norm -> mha(topk, k=40, kv_heads=1, head_dim=4, bias=false) -> norm -> ffn"]
# SAC: the cache of K, V and the edge keys, each new token's k edges over it, k past the sequence
SAC = ["norm -> mha(sac, k=3, chunk=4) -> norm -> ffn", "norm -> mha(sac, k=5, chunk=2, kv_heads=2, edge_dim=4) -> norm -> ffn",
       "norm -> mha(sac, k=40, kv_heads=1, head_dim=4, bias=false) -> norm -> ffn"]
# the modifiers (_scored.py): the cap on softmax and local, the sink logit; sinks: the first S keys beside the window
# (the cache: min(t, S) + min(t, w) keys)
MODIFIERS = ["norm -> mha(softmax, softcap=0.5, kv_heads=2) -> norm -> ffn", "norm -> mha(softmax, sink_logit=true) -> norm -> ffn",
             "norm -> mha(local, window=5, softcap=0.5) -> norm -> ffn",
             "norm -> mha(local, window=4, sinks=3, sink_logit=true, kv_heads=2) -> norm -> ffn",
             "norm -> mha(local, window=40, sinks=2, kv_heads=1, head_dim=4, bias=false) -> norm -> ffn",
             "norm -> mha(local, window=5, softcap=0.5, scale=0.3) -> norm -> ffn",
             # talking heads: P_l, P_w mixing the heads of every (query, key) pair, through the cache
             "norm -> mha(softmax, talking=true, kv_heads=2) -> norm -> ffn",
             "norm -> mha(local, window=5, sinks=2, talking=true) -> norm -> ffn",
             # talking=H: H softmax heads between the mixings, fewer and more than the 4 heads (the sink logit per H)
             "norm -> mha(softmax, talking=2, kv_heads=2) -> norm -> ffn",
             "norm -> mha(local, window=5, sinks=2, talking=7, sink_logit=true) -> norm -> ffn"]
# collaborative heads: the shared key cached per value head (no position scheme inside attention)
COLLAB = ["norm -> mha(softmax, collab=20, kv_heads=2) -> norm -> ffn", "norm -> mha(softmax, collab=6, bias=false) -> norm -> ffn",
          # on local: the last w shared keys (per value head) and values
          "norm -> mha(local, window=5, collab=20, kv_heads=2) -> norm -> ffn",
          "norm -> mha(local, window=40, collab=6, bias=false, scale=0.4) -> norm -> ffn"]
SPAN = ["norm -> mha(adaptive_span, max_span=6, R=2, span_init=0.5) -> norm -> ffn",  # spans randomized below
        "norm -> mha(adaptive_span, max_span=40, R=3, kv_heads=2) -> norm -> ffn"]
# sparse patterns over several blocks (29 tokens, l = 4), and l past the sequence
SPARSE = ["norm -> mha(sparse, stride=4) -> norm -> ffn", "norm -> mha(sparse, pattern=fixed, stride=5, c=2, kv_heads=2) "
          "-> norm -> ffn", "norm -> mha(sparse, stride=40, kv_heads=1) -> norm -> ffn"]
# Jukebox's patterns over rows of 4 (29 tokens: a part row at the end), and a row past the sequence
JUKEBOX = ["norm -> mha(jukebox, block=4) -> norm -> mha(jukebox, pattern=column, block=4, kv_heads=2) -> norm -> "
           "mha(jukebox, pattern=prev_row, block=4) -> ffn", "norm -> mha(jukebox, pattern=prev_row, block=40, kv_heads=1) "
           "-> norm -> mha(jukebox, block=40) -> ffn"]
# LogSparse's log-spaced keys (back to t - 16 at 29 tokens), the local variant, the convolution's last inputs
LOGSPARSE = ["norm -> mha(logsparse) -> norm -> ffn", "norm -> mha(logsparse, window=3, conv=4, kv_heads=2) -> norm -> ffn"]
# DeepSeek's MLA: the absorbed step against the cached latent and rotary key; query compression, v wider than q.k
MLA = ["norm -> mha(mla, kv_rank=16, rope_dim=4, nope_dim=6, v_dim=8) -> norm -> ffn",
       "norm -> mha(mla, kv_rank=8, q_rank=12, rope_dim=4, nope_dim=2, v_dim=10, heads=2, bias=false) -> norm -> ffn"]
# ETSformer's smoothing: the last output of every head, learned and fixed alpha, head_dim set
EXP_SMOOTHING = ["norm -> mha(exp_smoothing) -> norm -> ffn", "norm -> mha(exp_smoothing, alpha=0.3, heads=2, head_dim=4, bias=false) -> norm -> ffn"]
# the chunked linear recurrences: the state alone (dh x dh a query head); grouped K/V heads, a chunk of 4 (the prefill
# in chunks from the state), no rotation
RECURRENT = ["norm -> mha(retention, chunk=4) -> norm -> ffn", "norm -> mha(retention, v_factor=2, chunk=4) -> norm -> ffn",
             "norm -> mha(retention, kv_heads=2, gamma=0.9, rotate=false) -> norm -> ffn",
             "norm -> mha(gla, chunk=4, kv_heads=2) -> norm -> ffn",
             "norm -> mha(gsa, slots=6, chunk=4, kv_heads=2) -> norm -> ffn",
             "norm -> mha(deltanet, chunk=4, kv_heads=2) -> norm -> ffn", "norm -> mha(gated_deltanet, chunk=8, conv=3) -> norm -> ffn"]
# issue 14: Based's linear state and window (3 keys over the 29 tokens), chunks of 4 across the prefill
RECURRENT += ["norm -> mha(based, chunk=4, window=3, feature_dim=4, kv_heads=2) -> norm -> ffn",
              "norm -> mha(hedgehog, chunk=4, kv_heads=2, feature_dim=6) -> norm -> ffn",
              "norm -> mha(lightning, chunk=4, kv_heads=2, depth=0.8) -> norm -> ffn",
              "norm -> mha(fwp, chunk=4, kv_heads=2, nu=2) -> norm -> ffn"]
# the Average Attention Network: the running sum and the count; without the FFN, a narrow one
AVERAGE = ["norm -> mixer(average) -> norm -> ffn", "residual(mixer(average, ffn=false)) -> norm -> residual(mixer(average, d_ff=8, bias=false)) -> norm"]
# MGK: the K cache (r keys a token) and the V cache, one to three components, grouped and single K/V heads
MGK = ["norm -> mha(mgk) -> norm -> ffn", "norm -> mha(mgk, components=3, kv_heads=2) -> norm -> ffn",
       "norm -> mha(mgk, components=1, kv_heads=1, head_dim=4, bias=false) -> norm -> ffn",
       # form=linear: the running sums [S z] per K/V head
       "norm -> mha(mgk, form=linear) -> norm -> ffn", "norm -> mha(mgk, form=linear, components=3, kv_heads=2) -> norm -> ffn"]
# Reformer LSH: two and four buckets over chunks of 3 and 5 (29 tokens), two rounds (the cache: every query and value,
# re-hashed)
LSH = ["norm -> mha(lsh, buckets=2, chunk=3) -> norm -> ffn", "norm -> mha(lsh, buckets=4, chunk=5, rounds=2, kv_heads=2) -> norm -> ffn"]
# Routing Transformer: three and five clusters, windows of 3 and 4 over the 29 tokens, grouped K/V heads, a window
# past the sequence (the cache: every key and value, routed again each step)
ROUTING = ["norm -> mha(routing, clusters=3, window=3) -> norm -> ffn",
           "norm -> mha(routing, clusters=5, window=4, kv_heads=2) -> norm -> ffn",
           "norm -> mha(routing, clusters=2, window=40, kv_heads=1, head_dim=4, bias=false) -> norm -> ffn"]
# Synthesizer: the V cache (K too with vanilla mixed in), each new row's logits from its token (dense) or position
# (random), max_len past and at the 29 tokens
SYNTHESIZER = ["norm -> mha(synthesizer, max_len=32) -> norm -> ffn",
               "norm -> mha(synthesizer, kind=mixture, mix=dense_random_vanilla, max_len=40, kv_heads=2) -> norm -> ffn",
               "norm -> mha(synthesizer, kind=factorized_dense, max_len=32, kv_heads=1, head_dim=4, bias=false) -> norm -> ffn",
               "norm -> mha(synthesizer, kind=random, trainable=false, max_len=29) -> norm -> "
               "mha(synthesizer, kind=factorized_random, rank=3, max_len=30) -> ffn"]
# NAP: the K/V cache, each new row normalised over its past keys
NAP = ["norm -> mha(nap) -> norm -> ffn", "norm -> mha(nap, kv_heads=1, head_dim=4, bias=false, eps=0.001) -> norm -> ffn"]
# Scatterbrain's causal form: windows of 3 and 5 over the 29 tokens (the cache: the last w - 1 keys and values, the
# features' running sums and scale), grouped K/V heads, a window past the sequence
SCATTERBRAIN = ["norm -> mha(scatterbrain, window=3, features=8) -> norm -> ffn",
                "norm -> mha(scatterbrain, window=5, features=12, kv_heads=2) -> norm -> ffn",
                "norm -> mha(scatterbrain, window=40, features=6, kv_heads=1, head_dim=4, bias=false) -> norm -> ffn"]
# Sparse Sinkhorn: blocks of 4 and 3 over the 29 tokens (the cache: the inputs so far), a block past the sequence
SPARSE_SINKHORN = ["norm -> mha(sparse_sinkhorn, block=4, max_len=64) -> norm -> ffn",
                   "norm -> mha(sparse_sinkhorn, block=3, iters=2, kv_heads=2, max_len=64) -> norm -> ffn",
                   "norm -> mha(sparse_sinkhorn, block=40, kv_heads=1, head_dim=4, bias=false) -> norm -> ffn"]
# EL-attention: the cache holds X alone (grouped K/V heads, head_dim set)
EL = ["norm -> mha(el) -> norm -> ffn", "norm -> mha(el, kv_heads=2) -> norm -> ffn",
      "norm -> mha(el, kv_heads=1, head_dim=4, bias=false) -> norm -> ffn"]
# fixed maps: V of the last w positions (prev: 1) and the global / vertical running sums (one pattern per head,
# grouped K/V heads)
FIXED = ["norm -> mha(fixed, heads=5, head_dim=4) -> norm -> ffn", "norm -> mha(fixed, pattern=local, window=3, kv_heads=2) -> norm -> ffn",
         "norm -> mha(fixed, pattern=vertical, globals=3, kv_heads=1, head_dim=4, bias=false) -> norm -> ffn"]
# IGLOO: the last k - 1 inputs (the causal convolution) and the last ceil(3 spread) positions' C and values (the draws)
IGLOO = ["norm -> mixer(igloo, max_len=64) -> norm -> ffn", "norm -> mixer(igloo, max_len=40, patches=3, patch=6, kernel=4, bias=false) -> norm -> ffn"]
# Skip-Attention: Phi of the previous attention's output (the last k - 1 FC1 outputs and ECA's running sum kept),
# chaining over two skipping layers and across the repeat's copies
SKIP_REUSE = ["norm -> mha(softmax) -> norm -> ffn -> norm -> mha(skip_reuse) -> norm -> ffn",
              "norm -> mha(local, window=5, kv_heads=2) -> norm -> mha(skip_reuse, k=5, k_eca=5) -> norm -> "
              "mha(skip_reuse, expand=1, bias=false) -> norm -> ffn"]
# QKNorm (_qknorm.py): the cache keeps the normalised keys; grouped K/V heads, one K/V head
QKNORM = ["norm -> mha(softmax, qk_norm=true, qk_len=64, kv_heads=2) -> norm -> ffn",
          "norm -> mha(softmax, qk_norm=true, qk_len=8, kv_heads=1, bias=false) -> norm -> ffn"]
# nGPT: the cache of the normalised, scaled keys; the hypersphere updates around it
NGPT = ["residual(mha(ngpt), scale=ngpt) -> residual(ffn, scale=ngpt)",
        "residual(mha(ngpt, kv_heads=2, head_dim=4), scale=ngpt, alpha_init=0.3) -> residual(ffn, scale=ngpt)"]
# Mamba: the convolution's last k - 1 inputs and the state h (chunks of 4 and 7 across the prompt; no norm between,
# an ssm after an ssm)
MAMBA = ["norm -> ssm(mamba, chunk=4) -> norm -> ffn", "norm -> ssm(mamba, N=4, conv=2, chunk=7, bias=true) -> norm -> ssm(mamba, expand=1, dt_rank=3)",
         # Mamba-2: the convolution's window and the [H, P, N] state; groups of heads
         "norm -> ssm(mamba2, N=8, heads=4, groups=2, chunk=4) -> norm -> ffn"]
# RWKV-4: the time mix's last input and WKV's (num, den, max), the channel mix's last input (chunks of 4 and 7)
RWKV = ["norm -> rnn(rwkv4, chunk=4) -> norm -> ffn(rwkv)", "norm -> rnn(rwkv4, chunk=7) -> norm -> ffn(rwkv, d_ff=40) -> norm -> ffn",
        # RWKV-6: the last input and the heads' N x N states
        "norm -> rnn(rwkv6, head_size=8, chunk=4) -> norm -> ffn(rwkv)",
        # RWKV-7: the last input and the heads' N x N states (chunks of 7 across the prompt)
        "norm -> rnn(rwkv7, head_size=8, decay_rank=4, a_rank=4, gate_rank=8, chunk=7) -> norm -> ffn(rwkv)"]
# the linear RNNs (the rnn family): their recurrent states (HGRN2: e x d / H a head; chunks of 4 and 7 across the
# prompt, a lower bound, an rnn after an rnn)
RNN = ["norm -> rnn(hgrn2, heads=4, expand=8, chunk=4) -> norm -> ffn",
       "norm -> rnn(hgrn2, heads=2, expand=4, chunk=7, lower_bound=0.3) -> norm -> rnn(hgrn2, heads=8, expand=2)",
       # mLSTM: the convolution's window and the stabilised (C', n', m) a head
       "norm -> rnn(mlstm, heads=4, chunk=4) -> norm -> rnn(mlstm, heads=2, expand=1, conv=2, chunk=7, forget=exp) -> norm -> ffn"]
# the diagonal linear recurrences (rnn/_diag_scan.py): the complex state of LRU (chunks of 4 and 7 across the prompt)
DIAGONAL = ["norm -> ssm(lru, N=8, chunk=4) -> norm -> ffn", "norm -> ssm(lru, N=4, chunk=7) -> ssm(lru, N=3, chunk=5)",
            "norm -> ssm(s5, P=8, blocks=2, chunk=4) -> norm -> ffn",
            # QRNN: the last k - 1 inputs and the cell c; a per-token window
            "norm -> rnn(qrnn, window=3, chunk=4) -> norm -> ffn", "norm -> rnn(qrnn, window=1, chunk=7) -> rnn(qrnn, bias=false)",
            "norm -> rnn(gilr, chunk=4) -> norm -> rnn(gilr, chunk=7, bias=false)",  # GILR: h
            "norm -> rnn(gilr, chunk=4, lstm=true) -> norm -> rnn(gilr, chunk=7, lstm=true, bias=false)",  # GILR-LSTM: h~, c
            "norm -> rnn(sru) -> norm -> rnn(sru, scan=true, chunk=4) -> norm -> ffn",  # SRU: c, both forms
            "norm -> rnn(sru, attention=true) -> norm -> rnn(sru, attention=true, scan=true, proj=4, chunk=4)"]  # SRU++: c, K, V
# long convolutions: CKConv keeps every input so far (no finite state)
LONGCONV = ["norm -> longconv(ckconv, max_len=16) -> norm -> ffn",
            "norm -> longconv(flexconv, max_len=16, hidden=8) -> norm -> ffn",  # MAGNet
            "norm -> longconv(flexconv, max_len=16, hidden=8, kernel=siren) -> norm -> ffn",
            "longconv(ccnn, max_len=16) -> longconv(ccnn, max_len=16, hidden=8) -> norm -> ffn",  # the block's own norm, residual
            "norm -> longconv(talk, l_max=5, heads=4) -> norm -> longconv(talk, l_max=1)",  # TaLK: the last l_max inputs
            "norm -> ssm(lmu, order=6, theta=8.0, units=2, max_len=16) -> norm -> ffn",  # the LMU's memory [U, q]
            "norm -> ssm(lmu, order=4, theta=8.0, units=2, feedback=true) -> norm -> ffn"]  # the 2019 cell: m and h
# the Recurrent Delta Net: the fast weights and the last output of every head (a prefill loops over its tokens)
MAMBA += ["norm -> rnn(rfwp, heads=4) -> norm -> ffn", "norm -> rnn(rfwp, heads=2, head_dim=4, bias=false) -> norm -> ffn"]
# the FFT long convolutions: S4D's diagonal state; the others' growing histories of inputs
FFTCONV = ["norm -> ssm(s4d, N=8) -> norm -> ffn -> norm -> ssm(s4d, N=4, glu=false)",
            "norm -> longconv(long, max_len=64) -> norm -> ffn -> norm -> longconv(sgconv, max_len=16, kernel_dim=4)",
            "norm -> longconv(hyena, max_len=64, filter_order=8) -> norm -> longconv(hyena, max_len=64, order=1, filter_order=4)",
            "norm -> ssm(h3, N=8, shift=4) -> norm -> ffn -> norm -> ssm(h3, N=4, shift=2, head_dim=2)"]
CASES = ([(p, b) for p in POSITIONS for b in BLOCKS]
         + [(p, b) for p in POSITIONS if not p.startswith(SOFTMAX_ONLY) for b in BANDED + SPAN + CHUNK]
         + [(p, b) for p in POSITIONS if p.startswith(("pos(rope", "pos(learned", "pos(sin")) for b in LINEAR + RANDOM_FEATURES]
         + [(p, b) for p in POSITIONS if p.startswith(("pos(rope", "pos(learned", "pos(sin")) for b in MODIFIERS]
         + [(p, b) for p in POSITIONS if p.startswith(("pos(learned", "pos(sin")) for b in COLLAB]
         + [("pos(xl_rel)", b) for b in BLOCKS[:3]]  # Transformer-XL's relative scores, against the cache
         + [("pos(deberta, k=8)", b) for b in BLOCKS[:2]]  # DeBERTa's disentangled scores (29 tokens: clipped)
         + [(p, b) for p in ("pos(diet, max_len=64)", "pos(diet, mode=rel, k=8)") for b in BLOCKS]  # DIET's terms
         + [(p, b) for p in ("pos(tupe, heads=4, max_len=64, cls=true)", "pos(tupe, heads=4, max_len=64, mode=rel)")
            for b in BLOCKS]  # TUPE's untied correlation (and T5's buckets), the first token reset
         + [(p, b) for p in POSITIONS if p.startswith(("pos(learned", "pos(sin")) for b in RIGHT_PRODUCT + FMM + LUNA + BPT + MOMENTUM + FLOWFORMER + MEMORY_COMPRESSED + DILATED + COMBINER
            + HIERARCHICAL + MULTISCALE + FOURIER + FORGETTING + MOBA + NSA + EXP_SMOOTHING + MGK + AVERAGE + SPARSE_SINKHORN
            + SCATTERBRAIN + RECURRENT]
         + [(p, b) for p in POSITIONS if p.startswith(("pos(rope", "pos(learned")) for b in SPARSE]
         + [("pos(sinusoidal)", b) for b in AFT]
         + [(p, b) for p in POSITIONS if p.startswith(("pos(learned", "pos(sin")) for b in JUKEBOX + LOGSPARSE]
         + [(p, b) for p in POSITIONS if p.startswith(("pos(learned", "pos(sin")) for b in LONGFORMER]
         + [(p, b) for p in POSITIONS if p.startswith(("pos(rope", "pos(learned", "pos(sin")) for b in MLA]
         + [(p, b) for p in POSITIONS if p.startswith(("pos(learned", "pos(sin")) for b in LSH]
         + [(p, b) for p in POSITIONS if p.startswith(("pos(learned", "pos(sin")) for b in ROUTING]
         + [(p, b) for p in POSITIONS if not p.startswith(SOFTMAX_ONLY) for b in DIFFERENTIAL + SIGMOID]
         + [(p, b) for p in POSITIONS if p.startswith(("pos(learned", "pos(sin")) for b in SYNTHESIZER + NAP]
         + [(p, b) for p in POSITIONS if p.startswith(("pos(rope", "pos(learned", "pos(sin")) for b in TOPK]
         + [(p, b) for p in POSITIONS if p.startswith(("pos(learned", "pos(sin")) for b in EL + FIXED + IGLOO]
         + [(p, b) for p in POSITIONS if p.startswith(("pos(learned", "pos(sin")) for b in SAC]
         + [(p, b) for p in POSITIONS if p.startswith(("pos(rope", "pos(learned", "pos(sin")) for b in SKIP_REUSE]
         + [(p, b) for p in POSITIONS for b in QKNORM]
         + [(p, b) for p in POSITIONS if not p.startswith(("pos(xpos", "pos(kerple", "pos(randomized_rope"))
            for b in NGPT]
         + [(p, b) for p in POSITIONS if p.startswith(("pos(learned", "pos(sin")) for b in MAMBA + RWKV + RNN + DIAGONAL + LONGCONV + FFTCONV])


def _lean(cases: list) -> list:
    """The default run decodes each block with one of its position schemes (the k-th block's k-th, so that every
    scheme is run across the blocks); the block's other schemes are marked slow (`pytest -m slow`)."""
    schemes: dict = {}
    for pos, block in cases:
        schemes.setdefault(block, []).append(pos)
    order = list(schemes)
    return [pytest.param(pos, block, marks=[] if schemes[block][order.index(block) % len(schemes[block])] == pos
                         else [pytest.mark.slow]) for pos, block in cases]


# Huang et al.'s four methods (pos(huang)): mha(softmax) only, no residual scores
CASES += [(f"pos(huang, method={m}, k=3)", b) for m in (1, 2, 3, 4) for b in BLOCKS[:3]]
# PermuteFormer (pos(permute)): the decayed state, the new features permuted at their positions
CASES += [("pos(permute)", b) for b in LINEAR + RANDOM_FEATURES[:2]]
CASES += [("pos(kernel_rpe, max_len=64)", b) for b in LINEAR]  # every key's features kept
# translation-equivariant kernelized positions: the rotation's wider state; the clipped window and far sum
CASES += [(f"pos(equivariant_kernel{a})", b) for a in ("", ", method=clipped, clip=3") for b in LINEAR]
CASES = _lean(CASES)


@pytest.mark.parametrize("pos,block", CASES)
def test_attention_decodes_with_every_position_scheme(pos, block):
    """Softmax (MQA/GQA, RealFormer scores), local, adaptive-span (random learned spans) and linear attention,
    with every position scheme each supports: the decoded logits are the forward's, and the state holds exactly
    the declared cache."""
    src = ATTENTION.format(pos=pos, block=block)
    model = evodsl.compile(src, dtype=torch.float64)
    for mod in model.modules():  # adaptive spans away from their shared initial value
        if hasattr(mod, "spans"):
            with torch.no_grad():
                mod.span.copy_(torch.rand(mod.span.shape, generator=torch.Generator().manual_seed(4),
                                          dtype=mod.span.dtype))
        if hasattr(mod, "offsets") and mod.w is not None:  # AFT's position biases away from their initial 0
            with torch.no_grad():
                mod.w.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(1)
    state = _check_decode_equals_forward(model, torch.randint(0, 53, (3, 29), generator=g), g)
    assert state.nbytes() == 2 * evodsl.cost(src, seq=29, batch=3)["memory"]["kv_cache"]


@pytest.mark.parametrize("block", [BLOCKS[1], BANDED[0], LINEAR[0]])
def test_a_shared_body_keeps_a_state_per_application(block):
    """repeat(block, 3, shared=true) runs one module three times: each application has its own cache (one
    cache per module would mix the layers' keys), and the state holds three layers' worth."""
    src = ATTENTION.format(pos="pos(rope)", block=block).replace(", 2)", ", 3, shared=true)")
    model = evodsl.compile(src, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    state = _check_decode_equals_forward(model, torch.randint(0, 53, (2, 23), generator=g), g)
    assert len(state.caches) == 3
    assert state.nbytes() == 2 * evodsl.cost(src, seq=23, batch=2)["memory"]["kv_cache"]


def test_linear_attention_state_does_not_grow():
    """Linear attention decodes with a constant state: the same bytes after 100 and after 1000 tokens; local
    attention's stays at its window; softmax's grows with every token."""
    sizes = {}
    for name, block in (("linear", LINEAR[0]), ("local", BANDED[0]), ("softmax", BLOCKS[0])):
        model = evodsl.compile(ATTENTION.format(pos="pos(rope)", block=block))
        _, state = model.decode(torch.zeros(1, 10, dtype=torch.long))
        seen = {}
        with torch.no_grad():
            for t in range(1000 - 10):
                _, state = model.decode(torch.zeros(1, 1, dtype=torch.long), state)
                if state.seen in (100, 1000):
                    seen[state.seen] = state.nbytes()
        sizes[name] = seen
    assert sizes["linear"][100] == sizes["linear"][1000] == 2 * 4 * (8 * 8 + 8) * 4  # 2 layers, 4 heads, dh 8
    assert sizes["local"][100] == sizes["local"][1000] == 2 * 2 * 5 * 4 * 8 * 4  # K and V of the last 5
    assert sizes["softmax"][1000] == 10 * sizes["softmax"][100]


def test_generate_is_the_argmax_of_the_forward():
    src = ATTENTION.format(pos="pos(rope)", block=BLOCKS[1])
    model = evodsl.compile(src, dtype=torch.float64)
    prompt = torch.randint(0, 53, (2, 5), generator=torch.Generator().manual_seed(2))
    out = model.generate(prompt, max_new_tokens=12)
    assert out.shape == (2, 17) and torch.equal(out[:, :5], prompt)
    ids = prompt
    with torch.no_grad():
        for _ in range(12):  # the slow way: the whole sequence again for every token
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_sampling_is_reproducible_and_follows_its_knobs():
    model = evodsl.compile(ATTENTION.format(pos="pos(alibi)", block=BLOCKS[0]))
    prompt = torch.randint(0, 53, (3, 4), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=20, do_sample=True, temperature=1.5)
    a = model.generate(prompt, generator=torch.Generator().manual_seed(7), **kw)
    b = model.generate(prompt, generator=torch.Generator().manual_seed(7), **kw)
    c = model.generate(prompt, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = model.generate(prompt, max_new_tokens=20)
    top1 = model.generate(prompt, generator=torch.Generator().manual_seed(7), top_k=1, **kw)
    assert torch.equal(top1, greedy)  # top_k=1 is the argmax
    tiny_p = model.generate(prompt, generator=torch.Generator().manual_seed(9), top_p=1e-6, **kw)
    assert torch.equal(tiny_p, greedy)  # the nucleus of the smallest p is the most likely token


def test_generation_stops_per_row_at_eos():
    model = evodsl.compile(ATTENTION.format(pos="pos(rope)", block=BLOCKS[0]))
    prompt = torch.randint(0, 53, (2, 4), generator=torch.Generator().manual_seed(4))
    free = model.generate(prompt, max_new_tokens=10)
    eos = int(free[0, 6])  # the token row 0 produces third: row 0 stops there
    out = model.generate(prompt, max_new_tokens=10, eos_token_id=eos)
    first = (free[0, 4:] == eos).nonzero()[0].item() + 4
    assert torch.equal(out[0, :first + 1], free[0, :first + 1])
    assert (out[0, first + 1:] == eos).all()  # padded after its eos
    other = (free[1, 4:] == eos).nonzero()
    if len(other) == 0:  # row 1 never produces it: it runs to the end, as without eos
        assert torch.equal(out[1], free[1])


def test_ops_without_a_step_form_are_named_before_any_work():
    src = ("vocab = 20\nd_model = 16\nheads = 2\nmodel m(causal=true) {\n x = input(tokens) -> embed(token)\n"
           " y = x -> residual(xattn(softmax, kv=x)) -> head(lm)\n}")
    model = evodsl.compile(src)
    with pytest.raises(EvoError, match=r"E411.*xattn\(softmax\) reads stream 'x', which grows"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2)
    one = "vocab = 20\nd_model = 16\nheads = 2\nmodel m(causal=true) = input(tokens) -> embed(token) -> mha -> head(lm)"
    bidirectional = evodsl.compile(one.replace("causal=true", "causal=false"))
    with pytest.raises(EvoError, match="E411.*not causal"):
        bidirectional.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(EvoError, match="E411.*not causal"):
        bidirectional.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2, use_cache=False)


def test_use_cache_false_recomputes_and_equals_the_cache():
    """generate(use_cache=False) runs the whole sequence at every token: for a model with step forms it gives
    the cached generate's tokens (greedy and sampled, one generator seed); for a model without (the cross-attention
    above reads a stream that grows; Perceiver AR's latent window moves) it is the argmax of the forward."""
    model = evodsl.compile(ATTENTION.format(pos="pos(rope)", block=BLOCKS[1]), dtype=torch.float64)
    prompt = torch.randint(0, 53, (2, 5), generator=torch.Generator().manual_seed(5))
    assert torch.equal(model.generate(prompt, max_new_tokens=9, use_cache=False),
                       model.generate(prompt, max_new_tokens=9))
    kw = dict(max_new_tokens=9, do_sample=True, top_k=10)
    assert torch.equal(model.generate(prompt, generator=torch.Generator().manual_seed(1), use_cache=False, **kw),
                       model.generate(prompt, generator=torch.Generator().manual_seed(1), **kw))
    spec = ROOT / "specs" / "perceiver_ar.evo"
    par = evodsl.compile(spec, overrides=small(spec), dtype=torch.float64)
    with pytest.raises(EvoError, match=r"(?s)E411.*reads stream 'keys'.*use_cache=False"):
        par.generate(prompt, max_new_tokens=2)
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(6))  # >= its 5 latents
    out = par.generate(ids, max_new_tokens=5, use_cache=False)
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat([ids, par(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_use_cache_false_for_an_encoder_decoder():
    spec = ROOT / "specs" / "t5_small.evo"
    model = evodsl.compile(spec, overrides=small(spec), dtype=torch.float64)
    src = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(7))
    assert torch.equal(model.generate(src, max_new_tokens=6, use_cache=False), model.generate(src, max_new_tokens=6))
