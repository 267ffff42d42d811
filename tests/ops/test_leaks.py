"""Every causal attention op passes the leak test with every position scheme it supports, at an n that spans
several of its query blocks or chunks; and the leak test itself fails on ops that leak (tests/ophelpers.py)."""
from __future__ import annotations

import pytest
import torch

from evodsl.ops import REGISTRY, Ctx, load_all
from ophelpers import assert_no_leak, make_op, perturb_params

load_all()
D = 32
N = 70  # > 2 of the banded kernels' 32-query blocks; > 4 of linear attention's chunks at LINEAR_CHUNK
LINEAR_CHUNK = 16

BUILD = {  # mha variant -> small-window arguments, so that N spans several bands and blocks
    "softmax": {},
    "local": {"window": 6},
    "longformer": {"window": 6, "dilation": 2},  # the causal form has no globals; d = 1 is local's kernel
    "adaptive_span": {"max_span": 12, "R": 4, "span_init": 0.5},
    "linear": {},
    "fanet": {},
    "simpletron": {},
    "performer": {"features": 16},
    "rfa": {"features": 8},
    "learned_kernel": {"components": 2, "features": 8},
    "slim": {"features": 16},
    "mla": {"kv_rank": 16, "rope_dim": 4, "nope_dim": 6, "v_dim": 8},  # no kv_heads: one latent for every head
    "sparse": {"stride": 6},  # the fixed pattern's leak test: tests/ops/test_sparse.py
    "chunk": {"c": 16},  # four chunks of 16 and 6 tokens left over
    "logsparse": {"window": 2, "conv": 3},
    "jukebox": {"block": 6},  # rows of 6 (column and prev_row: tests/ops/test_jukebox.py)
    "fmm": {"w": 6, "kernels": 3},
    "lsh": {"buckets": 2, "chunk": 4, "rounds": 2},  # two buckets: every chunk mixes earlier and later tokens
    "scatterbrain": {"window": 6, "features": 16},  # windows of 6 over blocks of 6; the prefix sums in chunks of 16
    "luna": {"l": 6, "chunk": 16},  # N = 70: five chunks, both passes carry their states
    "bpt": {"k": 2},  # levels of 2, 4, 8 .. tokens: spans across the whole 70
    "momentum": {},
    "flowformer": {},
    "memory_compressed": {"k": 3},
    "combiner": {"block": 6},  # 12 blocks: each query reads its block's earlier keys, the earlier blocks' summaries
    "hierarchical": {"block": 2},  # levels of blocks of 2, 4, 8, 16, 32 tokens across the 70
    "multiscale": {"window": 2, "pool": 2, "scales": 3},  # windows of 2 tokens, blocks of 2, 4, then 8 to the start
    "fourier_integral": {"block": 16},  # query and key blocks of 16: 5 of them, the last of 6
    "forgetting": {},  # every key, decayed by the gates between it and the query
    "moba": {"block": 4, "topk": 3},  # 18 blocks: its own and the 2 best past ones
    "nsa": {"block": 4, "stride": 2, "select_block": 8, "topk": 3, "window": 6},  # 33 compressed and 9 selection blocks
    "dilated": {"pattern": "dilated_mem", "layer": 4},  # offsets up to 32 (and 0, 1, 2, 4, 8, 16)  # 23 slots; each query also reads its unfinished slot raw
    "differential": {},  # both maps causal (GQA: the harness's kv_heads=2)
    "sigmoid": {"block": 16},  # query and key blocks of 16: 5 of them, the last of 6
    "ngpt": {},  # SDPA's causal mask on the normalised q, k
    "routing": {"clusters": 3, "window": 4},  # three clusters over 70 tokens: each mixes earlier and later keys
    "mgk": {"components": 2},  # every pair (token, component) of the keys up to the query
    "exp_smoothing": {},  # chunks of 64: N = 70 spans two (the carry)
    "retention": {"chunk": 16},  # N = 70: five chunks, the state carried
    "gla": {"chunk": 16},
    "gsa": {"chunk": 16, "slots": 8},  # N = 70: five chunks, both passes carry their slot states
    "deltanet": {"chunk": 16}, "gated_deltanet": {"chunk": 16},  # and the short convolutions (4 taps)
    "based": {"chunk": 16, "window": 6, "feature_dim": 4},  # the linear state over five chunks, the window of 6
    "fwp": {"chunk": 16, "nu": 2},  # the fast weights over five chunks (the WY form)
    "lightning": {"chunk": 16, "depth": 0.9},  # five tiles, a slow decay carried across them
    "hedgehog": {"chunk": 16},  # the state [S z] over five chunks
    "synthesizer": {"kind": "mixture", "mix": "dense_random_vanilla", "max_len": 80},  # three kinds' logits summed
    "nap": {},  # each row's statistics over its past keys
    "sparse_sinkhorn": {"block": 4, "max_len": 128},  # 18 blocks: its own and a mixture of the past ones
    "topk": {"k": 5, "chunk": 16},  # 5 chunks of 16 queries, the last of 6, each against the keys up to its end
    "el": {},  # SDPA's causal mask over X
    "fixed": {"pattern": "mixed", "window": 3},  # local, prev, next (the token itself), global: each restricted to j <= i
    "sac": {"k": 4, "chunk": 16},  # the edge scores in 5 chunks of 16 queries, each against the keys up to its end
    "skip_reuse": {"k": 5, "k_eca": 5},  # Phi of its input: a causal 5-tap convolution, ECA over prefix means
}
CHUNKED = ("linear", "fanet", "simpletron", "performer", "rfa", "fmm", "momentum", "flowformer", "learned_kernel", "slim",
           "scatterbrain")  # causal forms in chunks of LINEAR_CHUNK tokens here (scatterbrain: its prefix sums)
CAUSAL_MHA = sorted(v for (f, v), op in REGISTRY.items() if f == "mha" and op.causal == "yes")
POSITIONS = {"rope": ("rope", {}), "rope_half": ("rope", {"fraction": 0.5}), "alibi": ("alibi", {}),
             "t5_bias": ("t5_bias", {"heads": 4, "buckets": 8, "max_distance": 20}), "xl_rel": ("xl_rel", {}),
             "xpos": ("xpos", {"scale_base": 16.0}), "kerple": ("kerple", {}),
             "kerple_power": ("kerple", {"kind": "power"}), "randomized_rope": ("randomized_rope", {"max_len": 128}),
             "deberta": ("deberta", {"k": 8}),
             "diet_abs": ("diet", {"mode": "abs", "max_len": 128}), "diet_rel": ("diet", {"mode": "rel", "k": 8}),
             "tupe_abs": ("tupe", {"heads": 4, "max_len": 128, "cls": True}),
             "tupe_rel": ("tupe", {"heads": 4, "max_len": 128, "mode": "rel", "buckets": 8, "max_distance": 20}),
             # pos(huang): its explicit scores (method 3's band and far matmuls; methods 1, 2 share the path) and SDPA's mask
             "huang3": ("huang", {"method": 3, "k": 3}), "huang4": ("huang", {"method": 4, "k": 3}),
             "permute": ("permute", {}), "kernel_rpe": ("kernel_rpe", {"max_len": 128}),
             # pos(equivariant_kernel): the rotation form in 64-token chunks; the clipped window past several k
             "equivariant_rotation": ("equivariant_kernel", {}),
             "equivariant_clipped": ("equivariant_kernel", {"method": "clipped", "clip": 3})}


def test_every_causal_attention_is_covered():
    assert set(CAUSAL_MHA) <= set(BUILD), f"add a small build to BUILD for: {set(CAUSAL_MHA) - set(BUILD)}"
    in_attention = {v for (f, v), op in REGISTRY.items() if f == "pos" and op.attach is not None}
    assert in_attention <= {p[0] for p in POSITIONS.values()}, "add every in-attention scheme to POSITIONS"


def _cases():
    for variant in CAUSAL_MHA:
        supports = REGISTRY[("mha", variant)].supports
        for pos in [None, *(p for p in POSITIONS if POSITIONS[p][0] in supports)]:
            yield pytest.param(variant, pos, False, id=f"{variant}-{pos or 'nopos'}")
        if "residual_scores" in supports:
            yield pytest.param(variant, None, True, id=f"{variant}-residual_scores")


@pytest.mark.parametrize("variant,pos,scores", list(_cases()))
def test_causal_attention_never_leaks(variant, pos, scores):
    grouped = {"kv_heads": 2} if "kv_heads" in REGISTRY["mha", variant].params.model_fields else {}  # not mla's
    m, _, _ = make_op("mha", variant, d=D, causal=True, heads=4, residual_scores=scores,
                      pos=POSITIONS[pos] if pos else None, **grouped, **BUILD[variant])
    if variant in CHUNKED:
        m.chunk = LINEAR_CHUNK
    perturb_params(m)
    if variant == "adaptive_span":  # perturbed spans spread over (0, 1]: heads reach back different distances
        with torch.no_grad():
            m.span.copy_(torch.tensor([0.2, 0.5, 0.8, 1.0], dtype=m.span.dtype))

    def run(x):
        ctx = Ctx()
        if scores:  # the previous layer's raw scores, [b, h, n, n], causal: nothing in them looks ahead
            g = torch.Generator().manual_seed(3)
            ctx.scores = torch.randn(x.shape[0], 4, x.shape[1], x.shape[1], generator=g, dtype=x.dtype)
        return m(x, ctx)

    with torch.no_grad():
        assert_no_leak(run, n=N, d=D)


# token mixers with a causal form (mixer family): every mode, at N across several bands
MIXER_BUILD = {"aft-full": ("aft", {"mode": "full", "max_len": N}), "aft-simple": ("aft", {"mode": "simple"}),
               "aft-local": ("aft", {"mode": "local", "max_len": N, "window": 6}),
               "aft-conv": ("aft", {"mode": "conv", "kernel": 5, "heads": 4}),
               "daft": ("daft", {"max_len": N, "rank": 4}),
               "average": ("average", {}),  # AAN: the cumulative average
               "igloo": ("igloo", {"max_len": N, "spread": 2.0})}  # patches up to 6 positions back, a kernel of 3
CAUSAL_MIXERS = sorted(v for (f, v), op in REGISTRY.items() if f == "mixer" and op.causal == "yes")


def test_every_causal_mixer_is_covered():
    assert set(CAUSAL_MIXERS) <= {v for v, _ in MIXER_BUILD.values()}, "add a build to MIXER_BUILD"


@pytest.mark.parametrize("key", list(MIXER_BUILD))
def test_causal_mixer_never_leaks(key):
    variant, args = MIXER_BUILD[key]
    m, _, _ = make_op("mixer", variant, d=D, causal=True, **args)
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=N, d=D)


# state-space, linear-recurrent and long-convolution layers (the ssm, rnn and longconv families): key -> (family,
# variant, build args); chunks of 4 and 7, several across N
SEQUENCE_FAMILIES = ("ssm", "rnn", "longconv")
SEQ_BUILD = {"mamba": ("ssm", "mamba", {"chunk": 4, "N": 8}), "mamba-7": ("ssm", "mamba", {"chunk": 7, "conv": 2, "N": 4}),
             "mamba2": ("ssm", "mamba2", {"chunk": 8, "N": 8, "heads": 4, "groups": 2}),
             "rwkv4": ("rnn", "rwkv4", {"chunk": 8}),  # RWKV: several chunks and a partial one across N
             "rwkv6": ("rnn", "rwkv6", {"chunk": 16, "head_size": 8, "mix_rank": 4, "decay_rank": 8}),
             "rwkv7": ("rnn", "rwkv7", {"chunk": 16, "head_size": 8, "decay_rank": 4, "a_rank": 4, "gate_rank": 8}),
             "hgrn2": ("rnn", "hgrn2", {"chunk": 32, "heads": 2, "expand": 8, "lower_bound": 0.2}),
             "mlstm": ("rnn", "mlstm", {"chunk": 32, "heads": 2, "expand": 1}),
             "lru": ("ssm", "lru", {"chunk": 4, "N": 8}),
             "s5": ("ssm", "s5", {"chunk": 4, "P": 8, "blocks": 2}),
             "qrnn": ("rnn", "qrnn", {"chunk": 4, "window": 3}),
             "gilr": ("rnn", "gilr", {"chunk": 4}), "gilr-lstm": ("rnn", "gilr", {"chunk": 4, "lstm": True}),
             "sru": ("rnn", "sru", {}), "sru-scan": ("rnn", "sru", {"scan": True, "chunk": 4}),
             "sru++": ("rnn", "sru", {"attention": True, "scan": True, "chunk": 4}),
             "ckconv": ("longconv", "ckconv", {"max_len": 16, "hidden": 8}),  # lags past max_len: the kernel extrapolated
             "flexconv": ("longconv", "flexconv", {"max_len": 16, "sigma": 2.0, "hidden": 8, "kernel": "siren"}),
             "flexconv-magnet": ("longconv", "flexconv", {"max_len": 16, "sigma": 2.0, "hidden": 8, "layers": 4}),
             "ccnn": ("longconv", "ccnn", {"max_len": 16, "sigma": 2.0, "hidden": 8}),
             "talk": ("longconv", "talk", {"l_max": 9, "heads": 4}),
             "lmu": ("ssm", "lmu", {"order": 6, "theta": 8.0, "units": 2, "max_len": 16})}
SEQ_BUILD |= {"rfwp": ("rnn", "rfwp", {"heads": 4})}  # the Recurrent Delta Net: every token through y_(t-1) and W
SEQ_BUILD |= {"lmu-feedback": ("ssm", "lmu", {"order": 6, "theta": 8.0, "units": 2, "max_len": 16, "feedback": True})}
#              (the 2019 LMU cell: every token through h_{t-1} and m_{t-1})
SEQ_BUILD |= {"s4d": ("ssm", "s4d", {"N": 8}), "long": ("longconv", "long", {"max_len": 80}),
             "sgconv": ("longconv", "sgconv", {"max_len": 40, "kernel_dim": 4}),
             "hyena": ("longconv", "hyena", {"max_len": 80, "filter_order": 8}),
             "h3": ("ssm", "h3", {"N": 8, "shift": 4, "head_dim": 2})}


def test_every_causal_sequence_layer_is_covered():
    causal = {(f, v) for (f, v), op in REGISTRY.items() if f in SEQUENCE_FAMILIES and op.causal == "yes"}
    assert causal <= {(f, v) for f, v, _ in SEQ_BUILD.values()}, "add it to SEQ_BUILD"


@pytest.mark.parametrize("key", list(SEQ_BUILD))
def test_sequence_layer_never_leaks(key):
    family, variant, args = SEQ_BUILD[key]
    m, _, _ = make_op(family, variant, d=D, causal=True, **args)
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=N, d=D)


# ------------------------------------------------------------------ the check itself can fail


def _peek_ahead(x):
    """Causal but for one token: position t also reads t + 1."""
    return x.cumsum(1) + 0.5 * torch.nn.functional.pad(x[:, 1:], (0, 0, 0, 1))


def _block_causal(x, block=16):
    """Causal across blocks, bidirectional within each block of 16: the leak a chunked kernel would have
    if it forgot its mask inside the chunk."""
    b, n, d = x.shape
    pad = -n % block
    xs = torch.nn.functional.pad(x, (0, 0, 0, pad)).reshape(b, -1, block, d)
    totals = xs.sum(2, keepdim=True).cumsum(1)  # each block sees all of itself and the blocks before
    return totals.expand_as(xs).reshape(b, -1, d)[:, :n]


def _last_block_leaks(x, block=32):
    """Exactly causal except that the last position of each 32-block reads the next block's first token."""
    y = x.cumsum(1).clone()
    for end in range(block - 1, x.shape[1] - 1, block):
        y[:, end] += x[:, end + 1]
    return y


@pytest.mark.parametrize("fn", [_peek_ahead, _block_causal, _last_block_leaks])
def test_leak_check_fails_on_a_leaky_op(fn):
    with pytest.raises(AssertionError, match="changed by"):
        assert_no_leak(fn, n=N, d=4)


def test_leak_check_fails_on_an_op_that_ignores_its_input():
    with pytest.raises(AssertionError, match="proves nothing"):
        assert_no_leak(lambda x: torch.zeros_like(x), n=N, d=4)


def test_leak_check_passes_an_exactly_causal_op():
    assert_no_leak(lambda x: x.cumsum(1), n=N, d=4)
