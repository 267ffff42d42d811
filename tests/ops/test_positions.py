"""pos(sinusoidal), pos(rope), pos(alibi) against their defining equations, written here in float64 from
python math and explicit loops, and end to end through mha(softmax) against a reference attention."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from evodsl.ops import ShapeProblem, load_all, lookup
from ophelpers import assert_no_leak, make_op, perturb_params


def _randn(*shape, seed=3):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ref_sinusoidal(n, d, base):
    return torch.tensor([[math.sin(t / base ** (c / d)) if c % 2 == 0 else math.cos(t / base ** ((c - 1) / d))
                          for c in range(d)] for t in range(n)], dtype=torch.float64)


def ref_rope(x, base, rot):
    """Each pair (x_2i, x_2i+1) at position t turned by t·base^(-2i/rot), one scalar at a time."""
    y = x.clone()
    for t in range(x.shape[-2]):
        for i in range(rot // 2):
            c, s = math.cos(t * base ** (-2 * i / rot)), math.sin(t * base ** (-2 * i / rot))
            a, b = x[..., t, 2 * i], x[..., t, 2 * i + 1]
            y[..., t, 2 * i], y[..., t, 2 * i + 1] = a * c - b * s, a * s + b * c
    return y


def ref_rope_halves(x, thetas):
    """HF Llama's layout: channel i and channel i + r/2 turn together by t·θ_i (r = 2 len(thetas)), one scalar at
    a time; the channels past r pass."""
    y, half = x.clone(), len(thetas)
    for t in range(x.shape[-2]):
        for i, theta in enumerate(thetas):
            c, s = math.cos(t * theta), math.sin(t * theta)
            a, b = x[..., t, i], x[..., t, i + half]
            y[..., t, i], y[..., t, i + half] = a * c - b * s, a * s + b * c
    return y


def llama3_thetas(base, rot, factor, low, high, original):
    """Llama 3.1's rope_scaling, from its definition, pair by pair in python floats."""
    out = []
    for i in range(rot // 2):
        theta = base ** (-2 * i / rot)
        wavelen = 2 * math.pi / theta
        if wavelen < original / high:
            out.append(theta)
        elif wavelen > original / low:
            out.append(theta / factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append((1 - smooth) * theta / factor + smooth * theta)
    return out


def ref_attention(m, x, causal, rope=None, slopes=None):
    """softmax(Q K^T / sqrt(dh) + bias) V with mha's own weights; rope=(base, rot) turns Q and K."""
    b, n, _ = x.shape
    h, g, dh = m.heads, m.kv_heads, m.head_dim
    proj = lambda lin, heads: (x @ lin.weight.T + lin.bias).view(b, n, heads, dh).transpose(1, 2)
    q, k, v = proj(m.q_proj, h), proj(m.k_proj, g), proj(m.v_proj, g)
    if rope:
        q, k = ref_rope(q, *rope), ref_rope(k, *rope)
    kv_of = [head // (h // g) for head in range(h)]
    s = q @ k[:, kv_of].transpose(-1, -2) / math.sqrt(dh)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    if slopes is not None:
        s = s - torch.tensor(slopes, dtype=torch.float64)[:, None, None] * (i - j).abs()
    if causal:
        s = s.masked_fill(j > i, float("-inf"))
    o = (s.softmax(-1) @ v[:, kv_of]).transpose(1, 2).reshape(b, n, h * dh)
    return o @ m.o_proj.weight.T + m.o_proj.bias


def test_declarations():
    load_all()
    for variant, in_attention in [("sinusoidal", False), ("rope", True), ("alibi", True)]:
        op = lookup("pos", variant)
        assert op.family == "pos" and op.causal == "yes" and "arXiv:" in op.paper and op.summary
        assert (op.attach is not None) == in_attention
    with pytest.raises(ValidationError):
        lookup("pos", "sinusoidal").params(base=1.0)
    with pytest.raises(ValidationError):
        lookup("pos", "rope").params(fraction=1.5)
    with pytest.raises(ValidationError):
        lookup("pos", "alibi").params(heads=8)


@pytest.mark.parametrize("d, base", [(8, 10000.0), (7, 100.0)])
def test_sinusoidal_adds_the_table(d, base):
    m, _, _ = make_op("pos", "sinusoidal", d=d, base=base)
    x = _randn(2, 20, d)
    assert torch.allclose(m(x, None), x + ref_sinusoidal(20, d, base), atol=1e-12, rtol=0)
    assert not list(m.parameters()) and not m.state_dict()


def test_sinusoidal_has_no_length_limit():
    m, _, _ = make_op("pos", "sinusoidal", d=6)
    pe = m(torch.zeros(1, 5000, 6, dtype=torch.float64), None)[0]
    for t in (0, 1, 4999):
        assert torch.allclose(pe[t], ref_sinusoidal(t + 1, 6, 10000.0)[t], atol=1e-9, rtol=0)


@pytest.mark.parametrize("variant", ["rope", "alibi"])
def test_in_attention_positions_leave_the_stream_alone(variant):
    m, _, _ = make_op("pos", variant, d=16)
    x = _randn(2, 5, 16)
    assert torch.equal(m(x, None), x)


@pytest.mark.parametrize("fraction, base", [(1.0, 10000.0), (0.5, 10.0)])
def test_rope_turns_each_pair(fraction, base):
    op = lookup("pos", "rope")
    rotary = op.attach(op.params(fraction=fraction, base=base), 4, 8)
    q, k = _randn(2, 4, 10, 8, seed=1), _randn(2, 2, 10, 8, seed=2)  # k has kv_heads=2 heads
    q2, k2 = rotary.rotate(q, k)
    rot = int(8 * fraction)
    assert torch.allclose(q2, ref_rope(q, base, rot), atol=1e-12, rtol=0)
    assert torch.allclose(k2, ref_rope(k, base, rot), atol=1e-12, rtol=0)
    assert rotary.bias(torch.arange(3)[:, None], torch.arange(3)[None, :]) is None


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rope_halves_layout(fraction):
    op = lookup("pos", "rope")
    rotary = op.attach(op.params(fraction=fraction, pairs="halves"), 4, 16)
    q, k = _randn(2, 4, 10, 16, seed=1), _randn(2, 2, 10, 16, seed=2)
    rot = int(16 * fraction)
    thetas = [10000.0 ** (-2 * i / rot) for i in range(rot // 2)]
    q2, k2 = rotary.rotate(q, k)
    assert torch.allclose(q2, ref_rope_halves(q, thetas), atol=1e-12, rtol=0)
    assert torch.allclose(k2, ref_rope_halves(k, thetas), atol=1e-12, rtol=0)
    # the same model as the paper's layout, up to a permutation of the rotated channels
    perm = torch.tensor([c for i in range(rot // 2) for c in (i, i + rot // 2)] + list(range(rot, 16)))
    paper = op.attach(op.params(fraction=fraction), 4, 16)
    assert torch.allclose(q2[..., perm], paper.rotate(q[..., perm], k[..., perm])[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("pairs", ["interleaved", "halves"])
def test_rope_llama3_scaling(pairs):
    op = lookup("pos", "rope")
    args = dict(base=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_len=64)
    rotary = op.attach(op.params(pairs=pairs, scaling="llama3", **args), 2, 32)
    thetas = llama3_thetas(500000.0, 32, 8.0, 1.0, 4.0, 64)
    kept = sum(t == 500000.0 ** (-2 * i / 32) for i, t in enumerate(thetas))
    assert 0 < kept < 16 and sum(t < 500000.0 ** (-2 * i / 32) / 7.99 for i, t in enumerate(thetas)) > 0
    q, k = _randn(1, 2, 9, 32, seed=6), _randn(1, 2, 9, 32, seed=7)
    q2, _ = rotary.rotate(q, k)
    if pairs == "halves":
        want = ref_rope_halves(q, thetas)
    else:  # the interleaved layout with the same frequencies: halves' reference on de-interleaved channels
        perm = torch.tensor(list(range(0, 32, 2)) + list(range(1, 32, 2)))
        want = torch.empty_like(q)
        want[..., perm] = ref_rope_halves(q[..., perm], thetas)
    assert torch.allclose(q2, want, atol=1e-12, rtol=0)


def test_rope_linear_scaling_interpolates_positions():
    op = lookup("pos", "rope")
    scaled = op.attach(op.params(scaling="linear", factor=4.0), 1, 8)
    thetas = [10000.0 ** (-2 * i / 8) / 4.0 for i in range(4)]
    q = _randn(1, 1, 12, 8, seed=8)
    perm = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # pair (2i, 2i+1) as (i, i + 4)
    want = torch.empty_like(q)
    want[..., perm] = ref_rope_halves(q[..., perm], thetas)
    assert torch.allclose(scaled.rotate(q, q)[0], want, atol=1e-12, rtol=0)


def test_rope_scaling_arguments_are_checked():
    op = lookup("pos", "rope")
    with pytest.raises(ValidationError, match="factor= scales"):
        op.params(factor=2.0)
    with pytest.raises(ValidationError, match="high_freq_factor > low_freq_factor"):
        op.params(scaling="llama3", low_freq_factor=4.0, high_freq_factor=1.0)


def test_rope_score_depends_on_offset_only():
    op = lookup("pos", "rope")
    rotary = op.attach(op.params(), 1, 16)
    n = 12
    q, k = rotary.rotate(_randn(1, 1, 1, 16, seed=4).expand(1, 1, n, 16),
                         _randn(1, 1, 1, 16, seed=5).expand(1, 1, n, 16))
    s = (q @ k.transpose(-1, -2))[0, 0]  # s[m, n] = q_m · k_n for one q vector and one k vector at every position
    for shift in (1, 5):
        assert torch.allclose(s[shift:, shift:], s[:-shift, :-shift], atol=1e-12, rtol=0)
    assert (s[0] - s[0, 0]).abs().max() > 1e-3  # ...and it does depend on the offset


def test_rope_fraction_must_give_even_channels():
    with pytest.raises(ShapeProblem) as e:
        make_op("mha", "softmax", d=32, heads=4, pos=("rope", {"fraction": 0.3}))  # 0.3 · 8 = 2.4 channels
    assert e.value.field == "fraction" and "fraction=0.25" in e.value.hint


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rope_through_softmax_attention(causal, fraction):
    m, _, _ = make_op("mha", "softmax", d=32, causal=causal, pos=("rope", {"fraction": fraction}),
                      heads=4, kv_heads=2)
    perturb_params(m)
    x = _randn(2, 9, 32)
    want = ref_attention(m, x, causal, rope=(10000.0, int(8 * fraction)))
    assert torch.allclose(m(x, None), want, atol=1e-10, rtol=0)
    if causal:
        assert_no_leak(lambda t: m(t, None), n=12)


def test_alibi_slopes():
    op = lookup("pos", "alibi")
    bias = op.attach(op.params(), 8, 4)
    assert bias.slopes.tolist() == [2.0 ** -h for h in range(1, 9)]
    # 6 heads: the slopes of 4 heads, then those of 8 heads at odd h (2^-1, 2^-3), as in the official code
    assert op.attach(op.params(), 6, 4).slopes.tolist() == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
    b = bias.bias(torch.arange(5)[:, None], torch.arange(3)[None, :])
    assert b.shape == (8, 5, 3) and b[2, 4, 1].item() == -3 * 2 ** -3 and b[0, 1, 2].item() == -0.5


@pytest.mark.parametrize("causal", [True, False])
def test_alibi_through_softmax_attention(causal):
    m, _, _ = make_op("mha", "softmax", d=32, causal=causal, pos=("alibi", {}), heads=4, kv_heads=2)
    perturb_params(m)
    x = _randn(2, 11, 32)
    want = ref_attention(m, x, causal, slopes=[2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8])
    assert torch.allclose(m(x, None), want, atol=1e-10, rtol=0)
    if causal:
        assert_no_leak(lambda t: m(t, None))
