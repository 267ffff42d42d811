"""Attention sinks on mha(local) (StreamingLLM: every query also reads the first S tokens) and the learned sink
logit (gpt-oss: a per-head logit in every softmax's denominator) on mha(softmax) and mha(local), against a float64
reference written from the equation (test_softcap.reference: an explicit key list per query); decoding keeps the
sinks and the window and equals the forward; leaks; padding (left refused with sinks); what is refused."""
from __future__ import annotations

import pytest
import torch

from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_no_leak, make_op, perturb_params
from .test_softcap import reference

D = 32

CASES = [  # variant, causal, n, build
    ("local", True, 70, {"window": 6, "sinks": 4}), ("local", False, 70, {"window": 6, "sinks": 4, "kv_heads": 2}),
    ("local", True, 100, {"window": 33, "sinks": 40, "kv_heads": 1}),  # sinks past the window's first block
    ("local", True, 3, {"window": 2, "sinks": 8}), ("local", False, 9, {"window": 3, "sinks": 1}),  # S > n, n < a block
    ("local", True, 70, {"window": 6, "sinks": 4, "sink_logit": True}),
    ("local", False, 45, {"window": 8, "sink_logit": True, "kv_heads": 2}),
    ("local", True, 10, {"window": 16, "sinks": 2, "sink_logit": True}),  # the window covers n
    ("local", True, 70, {"window": 6, "sinks": 4, "softcap": 0.7}),  # with the cap
    ("softmax", True, 70, {"sink_logit": True}), ("softmax", False, 130, {"sink_logit": True, "kv_heads": 2}),
    ("softmax", True, 5, {"sink_logit": True, "softcap": 0.7, "kv_heads": 1}),
]


@pytest.mark.parametrize("variant, causal, n, build", CASES)
def test_sinks_match_equation(variant, causal, n, build):
    m, _, _ = make_op("mha", variant, d=D, causal=causal, heads=4, **build)
    perturb_params(m)
    logit = m.sink_logit
    if logit is not None:  # logits around the scores' size: the sink takes a real share of the weight
        with torch.no_grad():
            logit.copy_(torch.tensor([-1.0, 0.5, 2.0, 4.0], dtype=torch.float64))
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    args = dict(softcap=build.get("softcap"), window=build.get("window"), sinks=build.get("sinks", 0))
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference(m, x, causal, logit=logit, **args)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        without = reference(m, x, causal, logit=None, **{**args, "sinks": 0})
        if (args["sinks"] and n > build["window"]) or logit is not None:
            assert (y - without).abs().max().item() > 1e-3  # the check sees the sinks


def test_sinks_keep_the_first_tokens_reachable():
    """With a window of 2, position 60 is still changed by token 1 (a sink), and not by token 20."""
    m, _, _ = make_op("mha", "local", d=D, causal=True, heads=4, window=2, sinks=2)
    perturb_params(m)
    x = torch.randn(1, 70, D, dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        for t, moved in ((1, True), (20, False)):
            x2 = x.clone()
            x2[0, t] += 1.0
            d = (m(x2, Ctx())[0, 60] - y[0, 60]).abs().max().item()
            assert (d > 1e-6) == moved, (t, d)


@pytest.mark.parametrize("build", [{"window": 6, "sinks": 4}, {"window": 6, "sinks": 4, "sink_logit": True},
                                   {"window": 40, "sinks": 3, "kv_heads": 2}])
def test_causal_does_not_leak(build):
    for pos in (None, ("rope", {})):
        m, _, _ = make_op("mha", "local", d=D, causal=True, heads=4, pos=pos, **build)
        perturb_params(m)
        with torch.no_grad():
            assert_no_leak(lambda x: m(x, Ctx()), n=70, d=D)


@pytest.mark.parametrize("causal", [False, True])
def test_right_padding_keeps_every_sequence_alone_and_left_is_refused(causal):
    m, _, _ = make_op("mha", "local", d=D, causal=causal, heads=4, kv_heads=2, window=6, sinks=3, sink_logit=True)
    perturb_params(m)
    x = torch.randn(3, 70, D, dtype=torch.float64)
    lengths = (70, 45, 2)
    mask = torch.arange(70)[None, :] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        for row, n in enumerate(lengths):
            assert (y[row, :n] - m(x[row:row + 1, :n], Ctx())[0]).abs().max().item() < 1e-10
        left = mask.flip(1)
        with pytest.raises(EvoError, match="E409.*right padding"):
            m(x, Ctx(mask=left))


def test_sink_logit_padding_any_side():
    """The sink logit alone reads no position: left padding is fine."""
    m, _, _ = make_op("mha", "softmax", d=D, causal=True, heads=4, sink_logit=True)
    perturb_params(m)
    x = torch.randn(2, 30, D, dtype=torch.float64)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, :12] = False
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        assert (y[1, 12:] - m(x[1:, 12:], Ctx())[0]).abs().max().item() < 1e-10


def test_sinks_only_on_local():
    with pytest.raises(Exception, match="sinks"):
        make_op("mha", "softmax", d=D, heads=4, sinks=4)
    import evodsl

    src = "d_model = 32\nmodel m(causal=true) = input(tokens, vocab=50) -> embed -> mha(softmax, sinks=4) -> head(lm)\n"
    with pytest.raises(EvoError, match=r"(?s)sinks"):
        evodsl.compile(evodsl.parse(src))


GROWTH = {  # the modifiers' kernel grows as its cost declares (tests/growth.py: FLOPs, peak and allocated bytes,
    # forward and backward): the band with sinks and the sink logit linear in n at n = 1k..8k (no hidden n x n);
    # softmax's capped rows quadratic (n = 512..4k: its [n, n] weights kept for backward)
    "local-sinks": ("local", {"window": 64, "sinks": 4, "sink_logit": True, "softcap": 50.0}, None),
    "softmax-softcap": ("softmax", {"softcap": 50.0, "sink_logit": True}, (512, 1024, 2048, 4096)),
}


@pytest.mark.parametrize("key", sorted(GROWTH))
@pytest.mark.parametrize("causal", [True, False])
def test_modifiers_grow_as_declared(key, causal):
    from growth import NS, TOL, _compare, check_growth, mha_growth

    variant, args, ns = GROWTH[key]
    ns = ns or NS

    got, flops, peak, bwd = mha_growth(variant, causal, ns, **args)
    if variant == "local":
        check_growth(f"mha({variant}, {args})", got, flops, peak, bwd)
    else:  # softmax's rows, one block at a time: the peak is one block (B n), but the blocks allocate n^2 bytes in
        # all, forward and backward (every score once): the FLOPs and the peak are checked, not the total
        problems = _compare("FLOPs", got.flops, flops, TOL) + _compare("peak bytes", got.peak, peak, TOL)
        problems += _compare("backward FLOPs", got.bwd_flops, bwd, TOL)
        assert not problems, "; ".join(problems)
