"""pos(xpos) against xPos's equation (2212.10554 §3.2), written here in float64 loops: each pair turned as RoPE
and scaled by ζ_i^(±t/B); through softmax and local attention (GQA, partial rotation, both pair layouts), the
score's decay with distance (the paper's extrapolation claim, as a formula), decoding at an offset."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from evodsl.ops import load_all, lookup
from ophelpers import assert_no_leak, decode_in_pieces, make_op, perturb_params


def _randn(*shape, seed=3):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ref_xpos(x, rot, sign, base=10000.0, gamma=0.4, scale_base=512.0, offset=0, halves=False):
    """x [..., n, dh]: pair i at position t = offset + row turned by t·base^(-2i/r) and scaled by
    ζ_i^(sign·t/B), ζ_i = (2i/r + γ)/(1 + γ); channels past r as they are. One scalar at a time."""
    y = x.clone()
    for row in range(x.shape[-2]):
        t = offset + row
        for i in range(rot // 2):
            theta = base ** (-2 * i / rot)
            zeta = (2 * i / rot + gamma) / (1 + gamma)
            f = zeta ** (sign * t / scale_base)
            c, s = math.cos(t * theta) * f, math.sin(t * theta) * f
            ia, ib = (i, i + rot // 2) if halves else (2 * i, 2 * i + 1)
            a, b = x[..., row, ia], x[..., row, ib]
            y[..., row, ia], y[..., row, ib] = a * c - b * s, a * s + b * c
    return y


def xpos(heads=4, head_dim=16, **kw):
    load_all()
    op = lookup("pos", "xpos")
    return op.attach(op.params(**kw), heads, head_dim)


@pytest.mark.parametrize("kw", [{}, {"gamma": 0.2, "scale_base": 16.0, "fraction": 0.5},
                                {"pairs": "halves", "scale_base": 8.0, "base": 100.0}])
def test_xpos_turns_and_scales_each_pair(kw):
    m = xpos(**kw)
    q, k = _randn(2, 4, 11, 16, seed=1), _randn(2, 2, 11, 16, seed=2)  # GQA: 2 key heads
    rot = int(16 * kw.get("fraction", 1.0))
    args = dict(base=kw.get("base", 10000.0), gamma=kw.get("gamma", 0.4), scale_base=kw.get("scale_base", 512.0),
                halves=kw.get("pairs") == "halves")
    for offset in (0, 7):
        q2, k2 = m.rotate(q, k, offset)
        assert torch.allclose(q2, ref_xpos(q, rot, +1, offset=offset, **args), atol=1e-12, rtol=0)
        assert torch.allclose(k2, ref_xpos(k, rot, -1, offset=offset, **args), atol=1e-12, rtol=0)


def ref_attention(m, x, causal, scale_base):
    b, n, _ = x.shape
    h, g, dh = m.heads, m.kv_heads, m.head_dim
    proj = lambda lin, heads: (x @ lin.weight.T + lin.bias).view(b, n, heads, dh).transpose(1, 2)
    q = ref_xpos(proj(m.q_proj, h), dh, +1, scale_base=scale_base)
    k = ref_xpos(proj(m.k_proj, g), dh, -1, scale_base=scale_base)
    v = proj(m.v_proj, g)
    kv_of = [head // (h // g) for head in range(h)]
    s = q @ k[:, kv_of].transpose(-1, -2) / math.sqrt(dh)
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    o = (s.softmax(-1) @ v[:, kv_of]).transpose(1, 2).reshape(b, n, h * dh)
    return o @ m.o_proj.weight.T + m.o_proj.bias


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("variant, args", [("softmax", {}), ("local", {"window": 40})])  # local: a band past n
def test_xpos_through_attention(variant, args, causal):
    m, _, _ = make_op("mha", variant, d=32, heads=4, kv_heads=2, causal=causal,
                      pos=("xpos", {"scale_base": 8.0}), **args)
    perturb_params(m, scale=0.3)
    x = _randn(2, 19, 32)
    with torch.no_grad():
        assert torch.allclose(m(x, None), ref_attention(m, x, causal, 8.0), atol=1e-10, rtol=0)


def test_the_score_decays_with_distance():
    """The claim: q_m·k_n = Σ_i ζ_i^((m−n)/B) |x_i|² cos((m−n)θ_i) for q = k = x at every position (the formula,
    exactly), relative; pair 0 always turns (θ_0 = 1), so with it zeroed and a base so large that no other pair
    turns over these distances, the score falls strictly with m − n > 0."""
    m = xpos(heads=1, head_dim=8, base=1e30, scale_base=16.0)
    v = _randn(1, 1, 1, 8, seed=4)
    v[..., :2] = 0.0
    n = 200
    q, k = m.rotate(v.expand(1, 1, n, 8), v.expand(1, 1, n, 8))
    s = (q @ k.transpose(-1, -2))[0, 0]
    zeta = [(2 * i / 8 + 0.4) / 1.4 for i in range(4)]
    theta = [1e30 ** (-2 * i / 8) for i in range(4)]
    pair = v[0, 0, 0].view(4, 2).pow(2).sum(-1).tolist()
    want = torch.tensor([sum(p * z ** (d / 16.0) * math.cos(d * t) for p, z, t in zip(pair, zeta, theta))
                         for d in range(n)], dtype=torch.float64)
    last = s[n - 1, :].flip(0)  # query at n - 1, keys at distance 0..n-1
    assert torch.allclose(last, want, rtol=1e-9, atol=0)
    assert (last[1:] < last[:-1]).all() and last[-1] < 0.5 * last[0]
    assert torch.allclose(s[5:, 5:], s[:-5, :-5], rtol=1e-9, atol=0)  # relative


def test_decoding_and_no_leak():
    m, _, _ = make_op("mha", "softmax", d=32, heads=4, kv_heads=2, causal=True, pos=("xpos", {"scale_base": 8.0}))
    perturb_params(m)
    x = _randn(2, 23, 32)
    with torch.no_grad():
        got, _ = decode_in_pieces(m, x, [6, 1, 1, 10, 5])
        assert torch.allclose(got, m(x, None), atol=1e-10, rtol=0)
        assert_no_leak(lambda t: m(t, None))


def test_declaration_and_arguments():
    load_all()
    op = lookup("pos", "xpos")
    assert op.causal == "yes" and "2212.10554" in op.paper and op.attach is not None
    assert "xpos" in lookup("mha", "softmax").supports and "xpos" not in lookup("mha", "linear").supports
    for bad in ({"gamma": 0.0}, {"scale_base": -1.0}, {"fraction": 1.5}, {"scaling": "yarn"}):
        with pytest.raises(ValidationError):
            op.params(**bad)
