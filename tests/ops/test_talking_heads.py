"""Talking heads (2003.02436) on mha(softmax) and mha(local): the logits mixed across heads by P_l before the
softmax, the weights by P_w after it, against a float64 reference written from the equation (dense einsums over
every position pair, the mask applied to the mixed logits); at P_l = P_w = I it is the plain op (SDPA's numbers);
the gradients; what is refused; padding, leaks and export (decoding: tests/test_decode.py's MODIFIERS)."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import (add_noise, assert_no_leak, exported_parity, head_projections, make_op, output_projection,
                       perturb_params)

D = 32


def reference(m, x, causal, window=None, softcap=None, sinks=0, logit=None, key_mask=None):
    """J_h(t, r) = q_th . k_rh / sqrt(dh) (capped: c tanh(J / c)); L_g = sum_h J_h P_l[h, g]; W_g = softmax_r L_g
    over query t's keys (softmax: r <= t causal, all otherwise; local: |t - r| < w, causal r <= t; the first
    `sinks` tokens too; padded keys out; a query with no key reads its own), with exp(a_g) in the denominator
    (logit); U_e = sum_g W_g P_w[g, e]; o_te = sum_r U_e(t, r) v_re."""
    q, k, v = head_projections(m, x)
    b, n, h, dh = q.shape
    g = h // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    J = torch.einsum("bthd,brhd->bhtr", q, k) / math.sqrt(dh)
    if softcap is not None:
        J = softcap * torch.tanh(J / softcap)
    L = torch.einsum("bhtr,hg->bgtr", J, m.talking.logits)
    t, r = torch.arange(n)[:, None], torch.arange(n)[None, :]
    keep = torch.ones(n, n, dtype=torch.bool)
    if window is not None:
        keep = ((t - r).abs() < window) | (r < sinks)
    if causal:
        keep = keep & (r <= t)
    keep = keep.expand(b, n, n)
    if key_mask is not None:
        keep = keep & key_mask[:, None, :]
        keep = keep | ((t == r) & ~keep.any(-1, keepdim=True))
    L = L.masked_fill(~keep[:, None], float("-inf"))
    H = L.shape[1]  # the softmax heads (talking=H)
    if logit is not None:
        L = torch.cat((L, logit.view(1, H, 1, 1).expand(b, H, n, 1)), -1)
    W = L.softmax(-1)[..., :n]
    U = torch.einsum("bgtr,ge->betr", W, m.talking.weights)
    o = torch.einsum("bhtr,brhd->bthd", U, v)
    return output_projection(m, o.reshape(b, n, h * dh))


CASES = [  # variant, causal, n, extra build
    ("softmax", False, 70, {}), ("softmax", True, 70, {}),  # blocks of 64: a second block of 6
    ("softmax", True, 130, {"kv_heads": 2}), ("softmax", False, 5, {"kv_heads": 1}),  # n below a block
    ("softmax", True, 9, {"head_dim": 6, "bias": False, "heads": 3}),
    ("softmax", True, 40, {"softcap": 0.7, "sink_logit": True, "kv_heads": 2}),  # with the other modifiers
    ("local", True, 70, {"window": 6}), ("local", False, 70, {"window": 6, "kv_heads": 2}),  # n no multiple of 32
    ("local", True, 45, {"window": 40, "kv_heads": 1}), ("local", False, 10, {"window": 16}),  # full layout
    ("local", True, 3, {"window": 2}), ("local", True, 50, {"window": 8, "sinks": 3, "softcap": 0.7}),
    # talking=H: H softmax heads between the mixings (P_l heads x H, P_w H x heads), fewer and more than heads
    ("softmax", True, 70, {"talking": 2, "kv_heads": 2}), ("softmax", False, 9, {"talking": 6, "kv_heads": 1}),
    ("softmax", True, 40, {"talking": 3, "softcap": 0.7, "sink_logit": True}),
    ("softmax", False, 66, {"talking": 7, "sink_logit": True, "kv_heads": 2}),
    ("local", True, 70, {"window": 6, "talking": 6, "kv_heads": 2}), ("local", False, 45, {"window": 40, "talking": 1}),
    ("local", True, 50, {"window": 8, "sinks": 3, "talking": 3, "sink_logit": True, "softcap": 0.7}),
    ("local", False, 5, {"window": 16, "talking": 5, "kv_heads": 1}),
]


@pytest.mark.parametrize("variant, causal, n, build", CASES)
def test_talking_heads_match_equation(variant, causal, n, build):
    build = dict(build)
    heads, talking = build.pop("heads", 4), build.pop("talking", True)
    m, _, _ = make_op("mha", variant, d=D if heads != 3 else 33, causal=causal, heads=heads, talking=talking, **build)
    H = heads if talking is True else talking
    assert m.talking.logits.shape == (heads, H) and m.talking.weights.shape == (H, heads)
    perturb_params(m)  # P_l, P_w random: every head reads every other
    x = torch.randn(2, n, D if heads != 3 else 33, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference(m, x, causal, build.get("window"), build.get("softcap"), build.get("sinks", 0), m.sink_logit)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        m.talking.logits.copy_(torch.eye(heads, H))
        m.talking.weights.copy_(torch.eye(H, heads))
        plain = reference(m, x, causal, build.get("window"), build.get("softcap"), build.get("sinks", 0), m.sink_logit)
        assert (ref - plain).abs().max().item() > 1e-2  # the check sees the mixing


@pytest.mark.parametrize("variant, build", [("softmax", {}), ("local", {"window": 6})])
@pytest.mark.parametrize("causal", [False, True])
def test_identity_mixing_is_the_plain_op(variant, build, causal):
    """At its initial P_l = P_w = I talking heads is the plain op (SDPA's or the banded kernel's numbers)."""
    m, _, _ = make_op("mha", variant, d=D, causal=causal, heads=4, kv_heads=2, talking=True, **build)
    plain, _, _ = make_op("mha", variant, d=D, causal=causal, heads=4, kv_heads=2, **build)
    perturb_params(plain)
    m.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 70, D, dtype=torch.float64)
    with torch.no_grad():
        y, want = m(x, Ctx()), plain(x, Ctx())
    assert want.abs().max().item() > 1.0
    assert (y - want).abs().max().item() < 1e-10


@pytest.mark.parametrize("variant, causal, build", [("softmax", True, {"kv_heads": 2}), ("local", False, {"window": 5}),
                                                    ("softmax", False, {"talking": 6}), ("local", True, {"window": 5, "talking": 2})])
def test_gradients_match_the_reference(variant, causal, build):
    """The training form (autograd through the blocks, no in-place): the gradients of the input and of P_l, P_w."""
    m, _, _ = make_op("mha", variant, d=D, causal=causal, heads=4, **{"talking": True, **build})
    perturb_params(m)
    x = torch.randn(2, 70, D, dtype=torch.float64, requires_grad=True)
    grads = []
    for fn in (lambda: m(x, Ctx()), lambda: reference(m, x, causal, build.get("window"))):
        m.zero_grad()
        x.grad = None
        fn().pow(2).sum().backward()
        grads.append((x.grad.clone(), m.talking.logits.grad.clone(), m.talking.weights.grad.clone()))
    for got, want in zip(*grads):
        assert (got - want).abs().max().item() < 1e-9 * want.abs().max().item()


@pytest.mark.parametrize("variant, build", [("softmax", {}), ("local", {"window": 6}), ("softmax", {"talking": 3}),
                                           ("local", {"window": 6, "talking": 6})])
@pytest.mark.parametrize("causal", [False, True])
def test_padding_keeps_every_sequence_alone(variant, build, causal):
    """A right- and a left-padded row give, at their tokens, the outputs of the tokens alone."""
    m, _, _ = make_op("mha", variant, d=D, causal=causal, heads=4, kv_heads=2, **{"talking": True, **build})
    perturb_params(m)
    x = torch.randn(3, 70, D, dtype=torch.float64)
    mask = torch.ones(3, 70, dtype=torch.bool)
    mask[1, 45:] = False  # right
    mask[2, :30] = False  # left
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        for row in range(3):
            alone = m(x[row:row + 1, mask[row]], Ctx())
            assert (y[row, mask[row]] - alone[0]).abs().max().item() < 1e-10


@pytest.mark.parametrize("variant, build, pos", [("softmax", {}, ("rope", {})), ("local", {"window": 6}, None),
                                               ("local", {"window": 40, "sinks": 2}, ("rope", {})),
                                               ("softmax", {"talking": 6}, None), ("local", {"window": 6, "talking": 3}, ("rope", {}))])
def test_causal_does_not_leak(variant, build, pos):
    """The mixing is per position pair (t, r): across heads, never across positions (n = 70: two blocks; the band
    layout's blocks of 32 and 39). rope is the one position scheme inside the modifiers' kernel."""
    m, _, _ = make_op("mha", variant, d=D, causal=True, heads=4, kv_heads=2, pos=pos, **{"talking": True, **build})
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=70, d=D)


def test_refusals_are_evo_errors():
    import evodsl

    head = "d_model = 32\nmodel m(causal=true) = input(tokens, vocab=50) -> embed -> "
    cases = [("mha(linear, talking=true)", r"(?s)E203.*unknown parameter 'talking' for mha\(linear\)"),
             ("mha(softmax, talking=true, dropout=0.1)", r"(?s)talking=true has no dropout"),
             ("pos(kerple) -> mha(softmax, talking=true)", r"(?s)turn q and k.*not pos\(kerple\)"),
             ("mha(local, talking=3, dropout=0.1)", r"(?s)talking=3 has no dropout"),
             ("mha(softmax, talking=0)", r"(?s)talking"), ("mha(softmax, talking=2.5)", r"(?s)talking")]
    for chain, message in cases:
        with pytest.raises(EvoError, match=message):
            evodsl.compile(evodsl.parse(f"{head}{chain} -> head(lm)\n"))


ONNX_SPECS = {  # the export's symbolic n runs _scored._gathered
    "causal": "mha(softmax, talking=3) -> mha(local, window=5, talking=6, sinks=2, sink_logit=true)",  # H < / > heads
    "bidirectional": "mha(softmax, talking=6) -> mha(local, window=5, talking=true)",
}


@pytest.mark.parametrize("mode", sorted(ONNX_SPECS))
def test_onnx_export_one_file_parity_at_three_lengths(mode, tmp_path):
    """One exported file (a symbolic n) gives torch's numbers in onnxruntime at n = 7, 33 and 70, within 1e-4 of
    the output's scale (float32); P_l and P_w perturbed, so the mixing is seen."""

    chain = " -> ".join(f"norm -> {op}" for op in ONNX_SPECS[mode].split(" -> "))
    src = (f"d_model = 32\nheads = 4\nkv_heads = 2\nmodel m(causal={str(mode == 'causal').lower()}) = "
           f"input(tokens, vocab=61) -> embed(token) -> pos(rope) -> {chain} -> norm -> head(lm)\n")
    worst = exported_parity(src, tmp_path, add_noise(("talking.logits", "talking.weights")))
    print(f"onnx {mode}: max relative error {worst:.2e}")
    assert worst <= 1e-4


GROWTH = {  # tests/growth.py: FLOPs, peak and allocated bytes, forward and backward. local's band linear in n at
    # n = 1k..8k (the mixing adds h^2 per score, no n x n); softmax quadratic (n = 512..4k, its rows one block at a time)
    "local": ({"window": 64, "talking": True}, None),
    "local, talking=3": ({"window": 64, "talking": 3}, None),  # H = 3 softmax heads beside the 2 heads
    "softmax": ({"talking": True}, (512, 1024, 2048, 4096)),
}


@pytest.mark.parametrize("variant, causal", [("local", True), ("local", False), ("local, talking=3", True),
                                             pytest.param("local, talking=3", False, marks=pytest.mark.slow),
                                             *[pytest.param("softmax", c, marks=pytest.mark.slow) for c in (True, False)]])
def test_talking_heads_grow_as_declared(variant, causal):  # softmax: ~1 min
    from growth import NS, TOL, _compare, check_growth, mha_growth

    args, ns = GROWTH[variant]
    ns = ns or NS
    variant = variant.split(",")[0]

    got, flops, peak, bwd = mha_growth(variant, causal, ns, **args)
    if variant == "local":
        check_growth(f"mha({variant}, {args})", got, flops, peak, bwd)
    else:  # one block at a time: the peak is one block (B n), the blocks allocate n^2 bytes in all
        problems = _compare("FLOPs", got.flops, flops, TOL) + _compare("peak bytes", got.peak, peak, TOL)
        problems += _compare("backward FLOPs", got.bwd_flops, bwd, TOL)
        assert not problems, "; ".join(problems)
