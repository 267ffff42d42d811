"""pos(kerple) against KERPLE's kernels (2205.09921 §4), written here in float64 loops: −r1 |m−n|^r2 and
−r1 log(1 + r2 |m−n|) per head, through softmax attention (causal and bidirectional, GQA, odd n), the clamps, the
gradient reaching r1 and r2, decoding at an offset, and the extrapolation claim as a formula (the bias falls
strictly with distance, for every head and any positive r1, r2)."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from evodsl.ops import load_all, lookup
from ophelpers import assert_no_leak, decode_in_pieces, make_op, perturb_params


def _randn(*shape, seed=3):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ref_kernel(kind, r1, r2, distance):
    """The paper's kernel for one head at one distance (r1, r2 as the authors clamp them)."""
    r1 = max(r1, 0.01)
    if kind == "power":
        return -r1 * distance ** min(max(r2, 0.01), 2.0)
    return -r1 * math.log(1 + max(r2, 0.01) * distance)


def ref_attention(m, x, causal, kind):
    b, n, _ = x.shape
    h, g, dh = m.heads, m.kv_heads, m.head_dim
    proj = lambda lin, heads: (x @ lin.weight.T + lin.bias).view(b, n, heads, dh).transpose(1, 2)
    q, k, v = proj(m.q_proj, h), proj(m.k_proj, g), proj(m.v_proj, g)
    kv_of = [head // (h // g) for head in range(h)]
    s = q @ k[:, kv_of].transpose(-1, -2) / math.sqrt(dh)
    r1, r2 = m.pos.r1.tolist(), m.pos.r2.tolist()
    bias = torch.tensor([[[ref_kernel(kind, r1[hh], r2[hh], abs(i - j)) for j in range(n)] for i in range(n)]
                         for hh in range(h)], dtype=torch.float64)
    s = s + bias
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    o = (s.softmax(-1) @ v[:, kv_of]).transpose(1, 2).reshape(b, n, h * dh)
    return o @ m.o_proj.weight.T + m.o_proj.bias


def _build(kind, causal, **kw):
    m, _, _ = make_op("mha", "softmax", d=32, heads=4, causal=causal, pos=("kerple", {"kind": kind}), **kw)
    perturb_params(m, scale=0.4)
    with torch.no_grad():  # r1, r2 spread over their ranges, one head clamped at each end
        m.pos.r1.copy_(torch.tensor([0.3, 1.7, -0.5, 0.9]))
        m.pos.r2.copy_(torch.tensor([1.2, 0.4, 0.7, 3.0] if kind == "power" else [0.2, 2.5, 0.005, 1.0]))
    return m


@pytest.mark.parametrize("kind", ["power", "log"])
@pytest.mark.parametrize("causal", [True, False])
def test_kerple_through_softmax_attention(kind, causal):
    m = _build(kind, causal, kv_heads=2)
    for n in (1, 13):
        x = _randn(2, n, 32, seed=n)
        with torch.no_grad():
            assert torch.allclose(m(x, None), ref_attention(m, x, causal, kind), atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", ["power", "log"])
def test_bias_at_any_positions_is_the_kernel(kind):
    """bias(i, j) for decoding's rectangles and dense(n) agree with the loops."""
    m = _build(kind, True).pos
    i, j = torch.arange(5, 9)[:, None], torch.arange(9)[None, :]
    got = m.bias(i, j)
    want = torch.tensor([[[ref_kernel(kind, m.r1[h].item(), m.r2[h].item(), abs(a - b)) for b in range(9)]
                          for a in range(5, 9)] for h in range(4)], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
    assert torch.allclose(m.dense(9, None)[:, 5:], want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["power", "log"])
def test_the_bias_falls_with_distance(kind):
    """The claim (§4: −kernel is CPD, and decreasing in |m − n|): for every head, at r1, r2 drawn over their
    ranges, the bias at distances 0..500 is 0 at 0 and strictly falling (the formula, exactly)."""
    load_all()
    op = lookup("pos", "kerple")
    torch.manual_seed(0)
    bias = op.attach(op.params(kind=kind), 8, 4).to(torch.float64)
    d = torch.arange(501, dtype=torch.float64)
    values = bias.kernel(d)
    assert values.shape == (8, 501) and (values[:, 0] == 0).all()
    assert (values[:, 1:] < values[:, :-1]).all()
    for h in range(8):
        want = torch.tensor([ref_kernel(kind, bias.r1[h].item(), bias.r2[h].item(), t) for t in range(501)],
                            dtype=torch.float64)
        assert torch.allclose(values[h], want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["power", "log"])
def test_r1_r2_are_learned(kind):
    m = _build(kind, True)
    m.train()
    m(_randn(2, 11, 32), None).square().sum().backward()
    g1, g2 = m.pos.r1.grad, m.pos.r2.grad
    assert g1 is not None and g2 is not None
    clamped2 = 3 if kind == "power" else 2  # head 2's r1 = -0.5; power's r2 = 3 > 2, log's r2 = 0.005 < 0.01
    assert g1[2] == 0 and g2[clamped2] == 0
    assert (g1[[0, 1, 3]].abs() > 0).all() and (g2[[h for h in range(4) if h not in (2, clamped2)]].abs() > 0).all()


@pytest.mark.parametrize("kind", ["power", "log"])
def test_decoding_and_no_leak(kind):
    m = _build(kind, True, kv_heads=2)
    x = _randn(2, 23, 32)
    with torch.no_grad():
        got, _ = decode_in_pieces(m, x, [7, 1, 1, 9, 5])
        assert torch.allclose(got, m(x, None), atol=1e-10, rtol=0)
        assert_no_leak(lambda t: m(t, None))


def test_declaration_and_arguments():
    load_all()
    op = lookup("pos", "kerple")
    assert op.causal == "yes" and "2205.09921" in op.paper and op.attach is not None
    assert op.attach(op.params(), 4, 8).r1.numel() == 4 and op.params().kind == "log"
    with pytest.raises(ValidationError):
        op.params(kind="gaussian")
    assert "kerple" in lookup("mha", "softmax").supports and "kerple" not in lookup("mha", "local").supports


def test_unsupported_pairing_names_both_sides():
    """E302 names the schemes mha(local) takes and the attentions pos(kerple) works inside."""
    import evodsl
    src = ("d_model = 32\nheads = 4\nmodel m(causal=true) = input(features, d=32) -> embed(linear) -> pos(kerple)"
           " -> mha(local, window=4) -> head(linear, d_out=2)")
    with pytest.raises(evodsl.EvoError) as e:
        evodsl.compile(src)
    text = str(e.value)
    assert "E302" in text and "mha(local) cannot apply pos(kerple)" in text
    assert "mha(local) supports: alibi, rope, xpos" in text and "pos(kerple) works inside: mha(softmax)" in text
