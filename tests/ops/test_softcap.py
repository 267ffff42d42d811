"""Score soft-capping (Gemma 2: s <- c tanh(s / c) before the softmax) on mha(softmax) and mha(local), against a
float64 reference written from the equation (per query, per head, an explicit key list); with a cap far above
every score it is the plain op (SDPA's numbers); the final-logit cap of head(lm); what is refused; decoding, leaks,
padding, growth and export of the capped forms (the shared harnesses key one build per variant)."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import (assert_no_leak, decode_in_pieces, head_projections, make_op, onnx_parity, output_projection,
                       perturb_params)

D = 32


def reference(m, x, causal, softcap, window=None, sinks=0, logit=None, scale=None, key_mask=None, turn=None,
              bias=None):
    """o_t = sum_r softmax_r(c tanh(q_t.k_r * scale / c)) v_r over query t's keys: softmax, r <= t (causal) or all;
    local, |t - r| < w (causal: t - w < r <= t), and the first `sinks` tokens (causal: r <= t); `logit` [h]: one
    more term exp(a_h) in the denominator. key_mask: padded keys out. turn(q, k): a position scheme's q and k at
    positions 0..n-1 ([b, n, heads, dh]); bias(head, t, r): a score bias added after the cap."""
    q, k, v = head_projections(m, x)
    if turn is not None:
        q, k = turn(q, k)
    b, n, h, dh = q.shape
    g = h // k.shape[2]
    scale = scale or 1 / math.sqrt(dh)
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bi in range(b):
        for t in range(n):
            keys = []
            for r in range(n):
                if causal and r > t:
                    continue
                if window is None or abs(t - r) < window or r < sinks:
                    if key_mask is None or key_mask[bi, r]:
                        keys.append(r)
            if not keys:
                keys = [t]
            for hh in range(h):
                s = torch.stack([q[bi, t, hh] @ k[bi, r, hh // g] * scale for r in keys])
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                if bias is not None:
                    s = s + torch.tensor([bias(hh, t, r) for r in keys], dtype=x.dtype)
                e = torch.exp(s - s.max())
                z = e.sum() + (0 if logit is None else torch.exp(logit[hh] - s.max()))
                out[bi, t, hh] = sum(e[i] / z * v[bi, r, hh // g] for i, r in enumerate(keys))
    return output_projection(m, out.reshape(b, n, h * dh))


CASES = [  # variant, causal, n, extra build
    ("softmax", False, 70, {}), ("softmax", True, 70, {}),  # blocks of 64: a second block of 6
    ("softmax", True, 130, {"kv_heads": 2}), ("softmax", False, 5, {"kv_heads": 1}),  # n below a block
    ("softmax", True, 9, {"scale": 0.3, "head_dim": 6, "bias": False}),
    ("local", True, 70, {"window": 6}), ("local", False, 70, {"window": 6, "kv_heads": 2}),  # n no multiple of 32
    ("local", True, 45, {"window": 40, "kv_heads": 1}), ("local", False, 100, {"window": 33}),
    ("local", True, 10, {"window": 16}), ("local", False, 10, {"window": 16}),  # the window covers n: full layout
    ("local", True, 3, {"window": 2}), ("local", True, 70, {"window": 6, "scale": 0.3, "kv_heads": 2}),  # Gemma 2
]


@pytest.mark.parametrize("variant, causal, n, build", CASES)
def test_softcap_matches_equation(variant, causal, n, build):
    c = 0.7  # below the scores of perturbed weights: the cap bends most of them
    m, _, _ = make_op("mha", variant, d=D, causal=causal, heads=4, softcap=c, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference(m, x, causal, c, build.get("window"), scale=build.get("scale"))
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        uncapped = reference(m, x, causal, None, build.get("window"), scale=build.get("scale"))
        assert (y - uncapped).abs().max().item() > 1e-3  # the check sees the cap


@pytest.mark.parametrize("variant, build", [("softmax", {}), ("local", {"window": 6})])
@pytest.mark.parametrize("causal", [False, True])
def test_a_high_cap_is_the_plain_op(variant, build, causal):
    """c tanh(s / c) = s - s^3 / (3 c^2) + ..: at c = 1e6 over these scores (|s| < 100) each moves by < 1e-6, and
    the capped op equals the uncapped one (SDPA's kernels) within 1e-6, a millionth of the output's scale."""
    m, _, _ = make_op("mha", variant, d=D, causal=causal, heads=4, kv_heads=2, softcap=1e6, **build)
    plain, _, _ = make_op("mha", variant, d=D, causal=causal, heads=4, kv_heads=2, **build)
    perturb_params(m)
    plain.load_state_dict(m.state_dict())
    x = torch.randn(2, 70, D, dtype=torch.float64)
    with torch.no_grad():
        y, want = m(x, Ctx()), plain(x, Ctx())
    assert want.abs().max().item() > 1.0
    assert (y - want).abs().max().item() < 1e-6


@pytest.mark.parametrize("variant, build", [("softmax", {}), ("local", {"window": 6})])
@pytest.mark.parametrize("causal", [False, True])
def test_padding_keeps_every_sequence_alone(variant, build, causal):
    """A right- and a left-padded row give, at their tokens, the outputs of the tokens alone."""
    m, _, _ = make_op("mha", variant, d=D, causal=causal, heads=4, kv_heads=2, softcap=0.7, **build)
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


def xpos_turn(q, k, scale_base=8.0):
    """pos(xpos)'s q and k ([b, n, heads, dh]) from test_xpos's scalar reference."""
    from .test_xpos import ref_xpos

    turn = lambda t, sign: ref_xpos(t.transpose(1, 2), t.shape[-1], sign, scale_base=scale_base).transpose(1, 2)  # noqa
    return turn(q, +1), turn(k, -1)


def alibi(hh, t, r, heads=4):
    """ALiBi's bias (Press et al. 2021) for 4 heads, written from the paper: -m_h |t - r|, m_h = 2^(-8 h / 4)."""
    return -(2.0 ** (-8.0 * (hh + 1) / heads)) * abs(t - r)


SCHEMES = {  # pos(...) inside the modified kernel, and how the reference applies it
    "xpos": (("xpos", {"scale_base": 8.0}), dict(turn=xpos_turn)),  # q, k turned and scaled (zeta^(+-t/B))
    "alibi": (("alibi", {}), dict(bias=alibi)),  # -m_h |t - r| added to the capped scores (not capped)
}


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("variant, causal, n, build", [
    ("softmax", True, 70, {}), ("softmax", False, 9, {"kv_heads": 2}),  # two blocks of queries; one
    ("local", True, 70, {"window": 6, "sinks": 2}), ("local", False, 45, {"window": 8, "kv_heads": 2}),  # the band
    ("local", True, 10, {"window": 16}), ("softmax", True, 20, {"sink_logit": True})])
def test_position_inside_the_modified_kernel(scheme, variant, causal, n, build):
    """pos(xpos) and pos(alibi) with the cap, sinks (StreamingLLM; on an ALiBi model, as MPT) and the sink logit:
    against the equation with test_xpos's reference turn or ALiBi's bias from the paper; causal, decoding in pieces
    gives the same."""
    c = 0.7
    pos, applied = SCHEMES[scheme]
    m, _, _ = make_op("mha", variant, d=D, causal=causal, heads=4, softcap=c, pos=pos, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    args = dict(window=build.get("window"), sinks=build.get("sinks", 0), logit=m.sink_logit)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference(m, x, causal, c, **applied, **args)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        assert (y - reference(m, x, causal, c, **args)).abs().max().item() > 1e-3  # the check sees the scheme
        if causal:
            got, _ = decode_in_pieces(m, x, [5, 1, 1, n - 7])
            assert (got - y).abs().max().item() < 1e-10 * max(y.abs().max().item(), 1.0)


@pytest.mark.parametrize("variant, build", [("softmax", {}), ("local", {"window": 6}), ("local", {"window": 40})])
def test_causal_does_not_leak(variant, build):
    for pos in (None, ("rope", {}), ("xpos", {"scale_base": 8.0}), ("alibi", {})):
        m, _, _ = make_op("mha", variant, d=D, causal=True, heads=4, kv_heads=2, softcap=0.7, pos=pos, **build)
        perturb_params(m)
        with torch.no_grad():
            assert_no_leak(lambda x: m(x, Ctx()), n=70, d=D)


def test_refusals():
    cases = [(dict(softcap=5.0, dropout=0.1), "no dropout"),
             (dict(softcap=5.0, pos=("kerple", {})), "only the position schemes that turn q and k"),
             (dict(softcap=5.0, residual_scores=True), "RealFormer")]
    for build, message in cases:
        with pytest.raises(Exception, match=message):
            make_op("mha", "softmax", d=D, heads=4, **build)
    with pytest.raises(Exception, match="greater than 0"):
        make_op("mha", "softmax", d=D, heads=4, softcap=0.0)


def test_refusals_are_evo_errors():
    import evodsl

    src = ("d_model = 32\nmodel m(causal=true) = input(tokens, vocab=50) -> embed -> pos(kerple) "
           "-> mha(softmax, softcap=50) -> head(lm)\n")
    with pytest.raises(EvoError, match=r"(?s)E\d+.*turn q and k, or ALiBi's bias \(pos\(alibi\), "
                                      r"pos\(randomized_rope\), pos\(rope\), pos\(xpos\)\).*not pos\(kerple\)"):
        evodsl.compile(evodsl.parse(src))


def test_final_logit_cap():
    """head(lm, softcap=c): logits = c tanh(h W^T / c), in float64 from the weight; the cap bounds them by c."""
    m, _, _ = make_op("head", "lm", d=D, vocab=50, tied=False, bias=True, softcap=3.0)
    perturb_params(m, scale=2.0)
    h = torch.randn(2, 7, D, dtype=torch.float64)
    with torch.no_grad():
        y = m(h)
        z = torch.einsum("bnd,vd->bnv", h, m.weight) + m.bias
        assert (y - 3.0 * torch.tanh(z / 3.0)).abs().max().item() < 1e-12
        assert z.abs().max().item() > 6.0 and y.abs().max().item() < 3.0
    hg = h.clone().requires_grad_()
    m(hg).sum().backward()  # the training form: the same values, a gradient through the tanh
    assert hg.grad is not None and torch.isfinite(hg.grad).all()


def test_a_gemma2_style_model_compiles_and_decodes():
    """Alternating local (window 4) and global layers, both capped at 50, the final logits at 30; rope inside."""
    import evodsl

    src = ("d_model = 32\nheads = 4\nkv_heads = 2\nmodel m(causal=true) = input(tokens, vocab=53) -> embed(token) -> pos(rope)"
           " -> repeat(norm -> mha(local, window=4, softcap=50) -> norm -> ffn -> norm -> mha(softcap=50) -> norm -> ffn, 2)"
           " -> norm -> head(lm, softcap=30)\n")
    model = evodsl.compile(src, dtype=torch.float64)
    ids = torch.randint(0, 53, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        a, state = model.decode(ids[:, :11])
        b, state = model.decode(ids[:, 11:], state)
    assert full.abs().max().item() <= 30.0
    assert (torch.cat((a, b), 1) - full).abs().max().item() < 1e-10 * full.abs().max().item()


ONNX_SPECS = {  # the modifiers in one model each way; the export's symbolic n runs _scored._gathered
    "causal": "mha(softmax, softcap=0.5) -> mha(local, window=5, softcap=0.5) -> "
              "mha(local, window=4, sinks=3, sink_logit=true) -> mha(softmax, sink_logit=true) -> "
              "mha(local, window=5, scale=0.3) -> mha(local, window=6, softcap=0.5, scale=0.3)",  # Gemma 2's scale
    "bidirectional": "mha(softmax, softcap=0.5) -> mha(local, window=5, softcap=0.5, sinks=2) -> "
                     "mha(softmax, sink_logit=true)",
}


@pytest.mark.parametrize("mode, pos", [(m, "rope") for m in sorted(ONNX_SPECS)] + [("causal", "xpos, scale_base=16"),
                                                                                      ("bidirectional", "alibi")])
def test_onnx_export_one_file_parity_at_three_lengths(mode, pos, tmp_path):
    """One exported file (a symbolic n, no branch on it) gives torch's numbers in onnxruntime at n = 7, 33 and 70
    (past the 64-query blocks), within 1e-4 of the output's scale (float32); with rope, xpos in the causal chain
    and ALiBi in the bidirectional one."""

    import evodsl

    chain = " -> ".join(f"norm -> {op}" for op in ONNX_SPECS[mode].split(" -> "))
    src = (f"d_model = 32\nheads = 4\nkv_heads = 2\nmodel m(causal={str(mode == 'causal').lower()}) = "
           f"input(tokens, vocab=61) -> embed(token) -> pos({pos}) -> {chain} -> norm -> head(lm, softcap=3)\n")
    path = tmp_path / "m.onnx"
    evodsl.export(src, path)  # the weights compile builds from seed 0; the sink logits at their initial 0
    graph, model = evodsl.parse(src), evodsl.compile(src)
    worst = onnx_parity(path, graph, model)
    print(f"onnx {mode}: max relative error {worst:.2e}")
    assert worst <= 1e-4
