"""Padding masks: a right-padded batch of sequences of different lengths gives, at every real position, the
outputs of each sequence run alone (float64, 1e-10), for every attention op with every position scheme it
supports, causal and bidirectional, and for every spec; an op that cannot keep padding out refuses it (E409).
The mask is HF's attention_mask: [b, n], 1 for a token, 0 for padding."""
from __future__ import annotations

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import REGISTRY, Ctx, load_all
from ophelpers import CAUSAL_ONLY, make_op, perturb_params
from spechelpers import IDS, SPECS, full_spans, model_inputs, small

load_all()
D, N = 32, 70  # N spans 3 of the banded kernels' 32-query blocks and 5 of linear attention's 16-token chunks
LENGTHS = [N, 45, 20, 1]
# longformer: its causal form has no globals (padding with globals: test_longformer.py and the longformer_base spec)
# bigbird (pad_alone=False): its blocks (the last one global, the random draw) follow the padded length, as HF's:
# a padded sequence is not the sequence alone, so the check is that the padding changes no real output
BUILD = {"softmax": {}, "local": {"window": 6}, "longformer": {"window": 6, "dilation": 2},
         "adaptive_span": {"max_span": 12, "R": 4, "span_init": 0.5},
         "linear": {}, "linformer": {"k": 16, "max_len": 128},
         "efficient": {}, "fastformer": {}, "fanet": {}, "ufo": {}, "simpletron": {},
         "separable": {}, "nystrom": {"landmarks": 24, "conv": 5}, "performer": {"features": 16}, "rfa": {"features": 8}, "momentum": {}, "flowformer": {},
         "lambda": {"k": 8, "u": 2, "r": 7}, "smart_bird": {"s": 6, "e": 8},
         "sparse": {"stride": 6}, "tglobal": {"radius": 5, "block": 8},
         "chunk": {"c": 16}, "jukebox": {"block": 6}, "logsparse": {"window": 2, "conv": 3}, "blockwise": {"blocks": 3, "identity": 2},
         "long_short": {"w": 8, "r": 4}, "fmm": {"w": 6, "kernels": 3},
         "isab": {"m": 6}, "luna": {"l": 6, "chunk": 16}, "star": {"rounds": 2},
         "skyformer": {"landmarks": 24}, "soft": {"landmarks": 24}, "bigbird": {"block": 8, "random": 1},
         "bpt": {"k": 2}, "memory_compressed": {"k": 3}, "lsh": {"buckets": 4, "chunk": 5, "rounds": 2}, "combiner": {"block": 6}, "dilated": {"pattern": "dilated_mem", "layer": 2}, "lara": {"C": 5, "m": 2}, "learned_kernel": {"components": 1, "features": 16},
         "colt5": {"window": 6, "k_q": 8, "k_kv": 24}, "hierarchical": {"block": 4}, "multiscale": {"window": 2},
         "fourier_integral": {"block": 16}, "forgetting": {}, "moba": {"block": 4, "topk": 2},
         "nsa": {"block": 4, "stride": 2, "select_block": 8, "topk": 3, "window": 6},
         "mla": {"kv_rank": 16, "rope_dim": 4, "nope_dim": 6, "v_dim": 8}, "yoso": {"hashes": 8, "tau": 3},
         "differential": {}, "sigmoid": {"block": 16}, "ngpt": {}, "clustered": {"clusters": 3, "bits": 8, "iterations": 3}, "routing": {"clusters": 3, "window": 4},
         "sinkformer": {"iters": 3}, "sparse_sinkhorn": {"block": 4, "max_len": 128}, "topk": {"k": 5, "chunk": 8}, "sac": {"k": 5, "chunk": 8}, "probsparse": {"factor": 2},
         "chord": {"max_len": 128},  # pad_alone=False: the links wrap mod the padded n; none into padding has weight
         "slim": {"features": 16}, "exp_smoothing": {}, "retention": {"chunk": 16}, "gla": {"chunk": 16}, "gsa": {"chunk": 16, "slots": 8}, "deltanet": {"chunk": 16}, "gated_deltanet": {"chunk": 16}, "based": {"chunk": 16, "window": 5, "feature_dim": 4}, "fwp": {"chunk": 16}, "lightning": {"chunk": 16, "depth": 0.9}, "hedgehog": {"chunk": 16}, "mgk": {"components": 2}, "etc": {"radius": 5, "globals": 3, "segment": 8},
         "synthesizer": {"kind": "mixture", "mix": "dense_random_vanilla", "max_len": 80}, "nap": {},
         "el": {}, "fixed": {"pattern": "mixed", "window": 3},
         "smyrf": {"clusters": 3, "rounds": 2}, "scatterbrain": {"clusters": 3, "features": 16, "window": 4},
         "skip_reuse": {"k": 4}}  # learned_kernel, slim: C M = 16 as performer's: with fewer features, none aligns
# with the padding's large-norm noise keys, whose unmasked weight is then ~1e-8 (the control)
CHUNKED = ("linear", "fanet", "simpletron", "performer", "rfa", "fmm", "momentum", "flowformer", "learned_kernel",
           "slim", "scatterbrain")  # causal forms in chunks: 16 tokens here, so that N spans several
POSITIONS = {"rope": ("rope", {}), "xpos": ("xpos", {"scale_base": 16.0}), "alibi": ("alibi", {}),
             "kerple": ("kerple", {}), "randomized_rope": ("randomized_rope", {"max_len": 128}),
             "t5_bias": ("t5_bias", {"heads": 4, "buckets": 8, "max_distance": 20}),
             "deberta": ("deberta", {"k": 16}), "diet": ("diet", {"mode": "abs", "max_len": N}),
             "tupe": ("tupe", {"heads": 4, "max_len": N, "mode": "rel", "cls": True, "buckets": 8, "max_distance": 20}),
             "huang": ("huang", {"method": 3, "k": 3}), "permute": ("permute", {}),
             "kernel_rpe": ("kernel_rpe", {"max_len": 128}),
             "equivariant_rotation": ("equivariant_kernel", {}),  # relative either way: padding shifts no weight
             "equivariant_clipped": ("equivariant_kernel", {"method": "clipped", "clip": 3})}  # relative: the distances between tokens are padding's either side
ABSOLUTE = ("diet", "tupe")  # position terms read from each row's start: left padding is refused (E409, their tests)
ATTENTION = sorted(v for f, v in REGISTRY if f == "mha")
KERNELIZED = ("linear", "performer", "rfa", "learned_kernel", "slim")  # chunked causal forms; phi after rope (absolute positions)
# Gaussian keys (MGK): a key's weight falls with |k|^2, so the padding's large-norm noise keys get ~1e-8 of the
# weight unmasked and the negative control cannot see them (tests/ops/test_mgk.py runs it with unit-scale padding)
FAINT_PADDING = ("mgk",)
RIGHT_ONLY = ("linformer", "chunk", "blockwise", "long_short", "jukebox", "bpt", "smart_bird",
             "memory_compressed", "etc", "combiner", "hierarchical", "multiscale", "moba",
             "nsa", "synthesizer", "sparse_sinkhorn", "probsparse")  # read positions counted from each row's start: left padding is refused


def test_every_attention_is_covered():
    assert set(ATTENTION) <= set(BUILD)


def _cases():
    for variant in ATTENTION:
        supports = REGISTRY[("mha", variant)].supports
        for causal in (True,) if variant in CAUSAL_ONLY else (False, True) if REGISTRY[("mha", variant)].causal != "no" else (False,):
            for pos in [None, *(p for p in POSITIONS if POSITIONS[p][0] in supports)]:
                yield pytest.param(variant, causal, pos, False,
                                   id=f"{variant}-{'causal' if causal else 'bidir'}-{pos or 'nopos'}")
            if "residual_scores" in supports:
                yield pytest.param(variant, causal, None, True, id=f"{variant}-{'causal' if causal else 'bidir'}-scores")


def padded_batch(lengths, n, d, generator, left=False):
    x = torch.randn(len(lengths), n, d, generator=generator, dtype=torch.float64)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return x, (mask.flip(1) if left else mask)


def _sided():
    """Left padding where the op sees relative positions only (rope in softmax scores, ALiBi, bands), so that a
    sequence moved to the end of its row is the same sequence (not linear, performer or rfa attention with rope:
    phi is applied after the rotation, which then depends on the absolute position); causal, only left padding puts padded
    keys before tokens."""
    for case in _cases():
        variant, causal, pos, scores = case.values
        yield pytest.param(*case.values, "right", id=f"{case.id}-right")
        if not (variant in KERNELIZED + ("ngpt",) and pos == "rope") and variant not in RIGHT_ONLY and pos not in ABSOLUTE:  # E409 (their tests)
            yield pytest.param(*case.values, "left", id=f"{case.id}-left")


@pytest.mark.parametrize("variant,causal,pos,scores,side", list(_sided()))
def test_padded_batch_equals_each_sequence_alone(variant, causal, pos, scores, side):
    grouped = {"kv_heads": 2} if "kv_heads" in REGISTRY["mha", variant].params.model_fields else {}
    m, _, _ = make_op("mha", variant, d=D, causal=causal, heads=4, residual_scores=scores,
                      pos=POSITIONS[pos] if pos else None, **grouped, **BUILD[variant])
    if variant in CHUNKED:
        m.chunk = 16
    perturb_params(m)
    if variant == "adaptive_span":
        with torch.no_grad():
            m.span.copy_(torch.tensor([0.2, 0.5, 0.8, 1.0], dtype=m.span.dtype))
    g = torch.Generator().manual_seed(0)
    x, mask = padded_batch(LENGTHS, N, D, g, left=side == "left")
    x[~mask] = torch.randn(int((~mask).sum()), D, generator=g, dtype=torch.float64) * 5  # padding is noise
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        assert torch.isfinite(y).all(), "padded positions must stay finite: the next layer reads them as keys"
        if not REGISTRY["mha", variant].pad_alone:
            x2 = x.clone()
            x2[~mask] = torch.randn(int((~mask).sum()), D, generator=g, dtype=torch.float64) * 5
            err = (m(x2, Ctx(mask=mask))[mask] - y[mask]).abs().max().item()
            assert err <= 1e-10 * y[mask].abs().max().item(), f"other padding changed real outputs: {err}"
        for i, L in enumerate(LENGTHS if REGISTRY["mha", variant].pad_alone else ()):
            real = mask[i]
            alone = m(x[i:i + 1, real], Ctx())
            err = (y[i, real] - alone[0]).abs().max().item()
            assert err <= 1e-10 * max(alone.abs().max().item(), 1.0), f"sequence {i} (length {L}): {err}"
        # the negative control: without the mask, padding reaches the shorter sequences (causal: from the left)
        if (not causal or side == "left") and variant not in FAINT_PADDING:
            unmasked = m(x, Ctx())
            assert (unmasked[2, mask[2]] - y[2, mask[2]]).abs().max().item() > 1e-6


# token mixers that honour padding (mixer family), each mode; full and local read absolute positions: right
# padding only (left padding is refused, E409: tests/ops/test_aft.py)
MIXER_BUILD = {"aft-full": ("aft", {"mode": "full", "max_len": N}, ("right",)),
               "aft-simple": ("aft", {"mode": "simple"}, ("right", "left")),
               "aft-local": ("aft", {"mode": "local", "max_len": N, "window": 6}, ("right",)),
               "aft-conv": ("aft", {"mode": "conv", "kernel": 5, "heads": 4}, ("right", "left")),
               "daft": ("daft", {"max_len": N, "rank": 4}, ("right",)),
               "average": ("average", {}, ("right", "left")),  # AAN: padding out of the sums and counts
               "igloo": ("igloo", {"max_len": N}, ("right",)),  # patches drawn per absolute position: left refused
               "hamburger-nmf": ("hamburger", {"r": 4, "steps": 3}, ("right", "left")),  # padded columns of X zeroed
               "hamburger-vq": ("hamburger", {"r": 4, "steps": 3, "kind": "vq"}, ("right", "left"))}
MIXER_CASES = [(k, c, side) for k, (v, _, sides) in MIXER_BUILD.items() for c in (False, True) for side in sides
               if not (c and REGISTRY["mixer", v].causal == "no")]


def test_every_padded_mixer_is_covered():
    padded = {v for (f, v), op in REGISTRY.items() if f == "mixer" and op.padding}
    assert padded <= {v for v, _, _ in MIXER_BUILD.values()}


def _sequence_op_pads(family: str, variant: str, args: dict, causal: bool, side: str) -> None:
    """A padded batch (padding random and large) through a sequence op gives, at every real token, what each
    sequence gives alone; without the mask the padding does change the shortest row (the control), where it can
    reach it (bidirectional, or padding on the left of a causal one)."""
    m, _, _ = make_op(family, variant, d=D, causal=causal, **args)
    perturb_params(m)
    g = torch.Generator().manual_seed(0)
    x, mask = padded_batch(LENGTHS, N, D, g, left=side == "left")
    x[~mask] = torch.randn(int((~mask).sum()), D, generator=g, dtype=torch.float64) * 5
    with torch.no_grad():
        y = m(x, Ctx(mask=mask, right_padded=side == "right"))
        assert torch.isfinite(y).all()
        for i in range(len(LENGTHS)):
            alone = m(x[i:i + 1, mask[i]], Ctx())
            err = (y[i, mask[i]] - alone[0]).abs().max().item()
            assert err <= 1e-10 * max(alone.abs().max().item(), 1.0), f"sequence {i}: {err}"
        if not causal or side == "left":
            assert (m(x, Ctx())[2, mask[2]] - y[2, mask[2]]).abs().max().item() > 1e-6


@pytest.mark.parametrize("key,causal,side", MIXER_CASES,
                         ids=[f"{k}-{'causal' if c else 'bidir'}-{s}" for k, c, s in MIXER_CASES])
def test_padded_mixer_equals_each_sequence_alone(key, causal, side):
    variant, args, _ = MIXER_BUILD[key]
    _sequence_op_pads("mixer", variant, args, causal, side)


# state-space, linear-recurrent and long-convolution layers (the ssm, rnn and longconv families): key -> (family,
# variant, causal, args, sides). Mamba's padded position enters neither the state (dt = 0) nor the convolution
# (its input zeroed), so either side pads; chunks of 4 across the lengths
SEQUENCE_FAMILIES = ("ssm", "rnn", "longconv")
SEQ_BUILD = {"mamba": ("ssm", "mamba", True, {"chunk": 4}, ("right", "left")),
             "mamba2": ("ssm", "mamba2", True, {"chunk": 4, "N": 4, "heads": 4, "groups": 2}, ("right", "left")),
             "rwkv4": ("rnn", "rwkv4", True, {"chunk": 4}, ("right", "left")),
             "rwkv6": ("rnn", "rwkv6", True, {"chunk": 4, "head_size": 8}, ("right", "left")),
             # RWKV-7: a padded position's key and rank-one term zeroed, its decay 1
             "rwkv7": ("rnn", "rwkv7", True, {"chunk": 4, "head_size": 8, "decay_rank": 4, "a_rank": 4, "gate_rank": 8},
                       ("right", "left")),
             # HGRN2: a padded position's key 1 - f is zeroed; its decay acts on a still-zero state (left padding)
             "hgrn2": ("rnn", "hgrn2", True, {"chunk": 4, "heads": 4, "expand": 8}, ("right", "left")),
             # mLSTM: a padded position writes nothing (i~ = -inf), decays nothing, and is no convolution input
             "mlstm": ("rnn", "mlstm", True, {"chunk": 4, "heads": 4, "expand": 1}, ("right", "left")),
             "lru": ("ssm", "lru", True, {"chunk": 4, "N": 8}, ("right", "left")),  # the input B u zeroed: no state
             "s5": ("ssm", "s5", True, {"chunk": 4, "P": 8}, ("right", "left")),
             "qrnn": ("rnn", "qrnn", True, {"chunk": 4, "window": 3}, ("right", "left")),  # no input, decay 1, window zeroed
             "gilr": ("rnn", "gilr", True, {"chunk": 4}, ("right", "left")),
             "gilr-lstm": ("rnn", "gilr", True, {"chunk": 4, "lstm": True}, ("right", "left")),  # h~ and c kept
             "sru": ("rnn", "sru", True, {}, ("right", "left")), "sru-scan": ("rnn", "sru", True, {"scan": True, "chunk": 4}, ("right", "left")),
             "sru++": ("rnn", "sru", True, {"attention": True}, ("right", "left")),  # padded keys get no weight
             # continuous-kernel convolutions: a padded input is zeroed before the FFT (a lag does not depend on the
             # row's start: either side)
             # (causal, right: a token never reads its right, so the left side is the check)
             "ckconv": ("longconv", "ckconv", True, {"max_len": 64, "hidden": 8}, ("left",)),
             "ckconv-bidir": ("longconv", "ckconv", False, {"max_len": 64, "hidden": 8}, ("right", "left")),
             "flexconv-bidir": ("longconv", "flexconv", False, {"max_len": 64, "sigma": 1.0, "hidden": 8, "kernel": "siren"}, ("left",)),
             "flexconv-magnet": ("longconv", "flexconv", True, {"max_len": 64, "sigma": 1.0, "hidden": 8}, ("left",)),
             "flexconv-magnet-bidir": ("longconv", "flexconv", False, {"max_len": 64, "sigma": 1.0, "hidden": 8}, ("right", "left")),
             "ccnn": ("longconv", "ccnn", True, {"max_len": 64, "sigma": 1.0, "hidden": 8}, ("left",)),
             "ccnn-bidir": ("longconv", "ccnn", False, {"max_len": 64, "sigma": 1.0, "hidden": 8}, ("right",)),
             # TaLK: a padded input is zeroed before the prefix sums (its windows' normaliser is a constant)
             "talk": ("longconv", "talk", True, {"l_max": 6, "heads": 4}, ("left",)),
             "talk-bidir": ("longconv", "talk", False, {"l_max": 6, "r_max": 9, "heads": 4}, ("right", "left")),
             "lmu": ("ssm", "lmu", True, {"order": 6, "theta": 8.0, "units": 2}, ("left",))}  # u zeroed: no memory
SEQ_BUILD |= {"rfwp": ("rnn", "rfwp", True, {"heads": 4}, ("right", "left"))}  # a padded token is skipped: W, y kept
SEQ_BUILD |= {"lmu-feedback": ("ssm", "lmu", True, {"order": 6, "theta": 8.0, "units": 2, "feedback": True},
                               ("right", "left"))}  # the 2019 cell: a padded token is skipped, m and h kept
SEQ_BUILD |= {"s4d": ("ssm", "s4d", True, {"N": 8}, ("right", "left")),
             "s4d-bidir": ("ssm", "s4d", False, {"N": 8}, ("right", "left")),
             "long": ("longconv", "long", True, {"max_len": 80}, ("right", "left")),
             "long-bidir": ("longconv", "long", False, {"max_len": 80}, ("right", "left")),
             "sgconv": ("longconv", "sgconv", True, {"max_len": 40, "kernel_dim": 4}, ("right", "left")),
             "sgconv-bidir": ("longconv", "sgconv", False, {"max_len": 40, "kernel_dim": 4}, ("right", "left")),
             "hyena": ("longconv", "hyena", True, {"max_len": 80, "filter_order": 8}, ("right", "left")),
             "bigs": ("ssm", "bigs", False, {"N": 8}, ("right", "left")),
             "h3": ("ssm", "h3", True, {"N": 8, "shift": 4, "head_dim": 2}, ("right", "left"))}
SEQ_CASES = [(k, side) for k, (*_, sides) in SEQ_BUILD.items() for side in sides]


def test_every_padded_sequence_layer_is_covered():
    padded = {(f, v) for (f, v), op in REGISTRY.items() if f in SEQUENCE_FAMILIES and op.padding}
    assert padded <= {(f, v) for f, v, *_ in SEQ_BUILD.values()}, "add it to SEQ_BUILD"


@pytest.mark.parametrize("key,side", SEQ_CASES, ids=[f"{k}-{s}" for k, s in SEQ_CASES])
def test_padded_sequence_layer_equals_each_sequence_alone(key, side):
    family, variant, causal, args, _ = SEQ_BUILD[key]
    _sequence_op_pads(family, variant, args, causal, side)


def test_fnet_refuses_padding():
    m, _, _ = make_op("mixer", "fnet", d=D)
    x, mask = padded_batch([8, 5], 8, D, torch.Generator().manual_seed(0))
    with pytest.raises(EvoError, match="mixer\\(fnet\\) cannot honour a padding mask"):
        m(x, Ctx(mask=mask))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_padded_batch_equals_each_sequence_alone_in_every_spec(spec):
    """A right-padded batch (an encoder-decoder's source and target both padded) gives at every real position
    what each sequence gives alone. An output of the last positions only (Perceiver AR's latents) has no such
    twin (which latents there are depends on where the window falls): _window_padding checks it instead."""
    over = small(spec)
    graph = evodsl.parse(spec, over)
    model = full_spans(evodsl.compile(spec, seed=0, overrides=over, dtype=torch.float64))
    two = len(graph.inputs) > 1
    n, m = 70, 41
    g = torch.Generator().manual_seed(2)
    xs = model_inputs(graph, 3, n, m, generator=g)
    out = graph.output.meta["shape"]
    tail = out[1] if len(out) == 3 and isinstance(out[1], int) else None  # [b, L, ...]: the last L positions
    if tail is not None:
        return _window_padding(spec, graph, model, xs[0], tail)
    lengths, target_lengths = [70, 33, 9], [29, 41, 6]
    masks = {"attention_mask": (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).long()}
    if two:
        masks["decoder_attention_mask"] = (torch.arange(m)[None, :] < torch.tensor(target_lengths)[:, None]).long()
    if any(c.op.id == "mixer(fnet)" for c in graph.calls()):
        with pytest.raises(EvoError, match="E409|cannot honour a padding mask"):
            model(*xs, **masks)
        return
    with torch.no_grad():
        y = model(*xs, **masks)
        assert torch.isfinite(y).all()
        if not all(c.op.pad_alone for c in graph.calls()):  # padding read nowhere (its layout may follow it)
            other = [t.clone() for t in xs]
            for t, key in zip(other, ("attention_mask", "decoder_attention_mask")):
                pad = masks[key] == 0
                t[pad] = t[pad] + 1 if t.is_floating_point() else (t[pad] + 1) % graph.inputs[0].params.vocab
            y2 = model(*other, **masks)
            real = slice(None) if y.dim() == 2 else masks["decoder_attention_mask" if two else "attention_mask"].bool()
            err = (y2[real] - y[real]).abs().max().item()
            assert err <= 1e-10 * y[real].abs().max().item(), f"{spec.stem}: other padding changed real outputs"
            lengths = ()
        for i, L in enumerate(lengths):
            alone = model(xs[0][i:i + 1, :L], *([xs[1][i:i + 1, :target_lengths[i]]] if two else []))[0]
            if y.dim() == 2:  # a pooler's [b, d]
                got, want = y[i], alone
            else:
                real = target_lengths[i] if two else L  # positions 0 .. real - 1 are tokens
                got, want = y[i, :real], alone[:real]
            err = (got - want).abs().max().item()
            assert err <= 1e-10 * want.abs().max().item(), f"{spec.stem}, sequence {i} (length {L}): {err}"
        ones = {k: torch.ones_like(v) for k, v in masks.items()}
        assert torch.equal(model(*xs, **ones), model(*xs)), "all ones = no mask"


def _window_padding(spec, graph, model, ids, tail):
    """A model whose output is its last `tail` positions, on a left-padded batch (so that the window holds
    tokens): changing the padded tokens changes no output, and without the mask it does (the control)."""
    n = ids.shape[1]
    lengths = [n, n - 10, n - 30]
    assert min(lengths) >= tail
    mask = (torch.arange(n)[None, :] >= n - torch.tensor(lengths)[:, None]).long()
    other = ids.clone()
    g = torch.Generator().manual_seed(5)
    pad = mask == 0
    other[pad] = (ids[pad] + torch.randint(1, graph.input.params.vocab, (int(pad.sum()),), generator=g)) \
        % graph.input.params.vocab
    with torch.no_grad():
        y, y2 = model(ids, attention_mask=mask), model(other, attention_mask=mask)
        unmasked, unmasked2 = model(ids), model(other)
    scale = y.abs().max().item()
    assert (y - y2).abs().max().item() <= 1e-10 * scale, f"{spec.stem}: padded tokens reached the output"
    assert (unmasked[1:] - unmasked2[1:]).abs().max().item() > 1e-3 * scale, f"{spec.stem}: the control"


def test_token_type_ids_reach_the_segment_embedding():
    """BERT's embed(token, segments=2): token_type_ids pick each token's segment row; None means segment 0."""
    spec = SPECS[IDS.index("bert")]
    over = small(spec)
    model = evodsl.compile(spec, seed=0, overrides=over, dtype=torch.float64)
    emb = model.embed
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    types = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    want = emb.weight[ids] + emb.segment.weight[types]
    assert torch.equal(emb(ids, Ctx(token_type_ids=types)), want)
    assert torch.equal(emb(ids, Ctx()), emb.weight[ids] + emb.segment.weight[0])
    with torch.no_grad():
        assert not torch.equal(model(ids, token_type_ids=types), model(ids))
        assert torch.equal(model(ids, token_type_ids=torch.zeros_like(types)), model(ids))


def test_a_causal_model_keeps_its_fast_path_on_a_right_padded_batch(monkeypatch):
    """Right padding puts every padded key after every token: a causal model's attention needs no mask (SDPA
    keeps is_causal); left padding does need it; a bidirectional model always does."""
    import torch.nn.functional as F

    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: seen.append(k.get("attn_mask") is None) or sdpa(*a, **k))
    src = "d_model = 32\nheads = 4\nmodel m(causal={c}) = input(tokens, vocab=50) -> embed(token) -> mha -> head(lm)"
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    right = (torch.arange(10)[None, :] < torch.tensor([[10], [6]])).long()
    for causal, mask, unmasked in (("true", right, True), ("true", right.flip(1), False), ("false", right, False)):
        seen.clear()
        with torch.no_grad():
            evodsl.compile(src.format(c=causal))(ids, attention_mask=mask)
        assert seen == [unmasked], (causal, mask.tolist())
