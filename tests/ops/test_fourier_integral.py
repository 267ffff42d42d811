"""mha(fourier_integral) against FourierFormer's estimator (eq. 11), in float64: per query and head, the kernel
prod_l phi(sin(R (q_il - k_jl)) / (R (q_il - k_jl))) with phi(z) = z^p computed directly as a product (no log
domain, no tiles), its row sum as the denominator, an explicit key list per query (causal: j <= i; padded keys
out). Block sizes that divide n and do not, blocks longer than n, GQA, learned and fixed R, p = 2 and 4; the
gradients (q, k, v and R) against finite differences; the export's plain form equals the tiled one; odd powers,
dropout and position schemes refused. Decoding equals the forward (test_decode.py), the causal form does not leak
(test_leaks.py), padding (test_padding.py)."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_no_leak, head_projections, make_op, output_projection, perturb_params

D = 32


def reference(m, x, R, p, causal, key_mask=None):
    q, k, v = head_projections(m, x)  # [b, n, h, dh], [b, n, kv, dh]
    b, n, h, dh = q.shape
    g = h // k.shape[2]
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        for t in range(n):
            keys = [j for j in range(n) if (not causal or j <= t) and (key_mask is None or key_mask[bb, j])]
            for hh in range(h):
                w = []
                for j in keys:
                    prod = 1.0
                    for ll in range(dh):
                        z = R * (q[bb, t, hh, ll] - k[bb, j, hh // g, ll])
                        prod = prod * (1.0 if z == 0 else math.sin(z) / z) ** p
                    w.append(prod)
                w = torch.tensor(w, dtype=x.dtype)
                out[bb, t, hh] = (w / w.sum()) @ v[bb, keys, hh // g]
    return output_projection(m, out.reshape(b, n, h * dh))


CASES = [  # causal, block, n, kv_heads, power
    (False, 4, 12, None, 4), (True, 4, 12, None, 4),  # blocks dividing n
    (False, 5, 13, 2, 4), (True, 5, 13, 2, 4),  # a partial last block, grouped K/V heads
    (True, 3, 11, 1, 2), (False, 7, 9, 1, 2),  # multi-query, p = 2
    (True, 64, 6, 2, 4), (False, 64, 6, None, 4),  # n smaller than a block: one tile
    (True, 1, 5, None, 4),  # one position a block
]


@pytest.mark.parametrize("causal, block, n, kv_heads, power", CASES)
def test_fourier_integral_matches_equation(causal, block, n, kv_heads, power):
    m, _, _ = make_op("mha", "fourier_integral", d=D, causal=causal, heads=4, kv_heads=kv_heads, block=block,
                      power=power)
    perturb_params(m)
    with torch.no_grad():
        m.R.fill_(0.7)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference(m, x, 0.7, power, causal)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        if n > 1:  # the comparison sees the kernel: another R, another power, the other mask differ
            assert (y - reference(m, x, 0.9, power, causal)).abs().max().item() > 1e-6
            assert (y - reference(m, x, 0.7, power + 2, causal)).abs().max().item() > 1e-6
            assert (y - reference(m, x, 0.7, power, not causal)).abs().max().item() > 1e-6


@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_take_no_part(causal):
    """Left and right padding: padded keys get no weight (the reference drops them from the key list)."""
    m, _, _ = make_op("mha", "fourier_integral", d=D, causal=causal, heads=4, kv_heads=2, block=4)
    perturb_params(m)
    with torch.no_grad():
        m.R.fill_(0.6)
    x = torch.randn(2, 11, D, dtype=torch.float64)
    key_mask = torch.ones(2, 11, dtype=torch.bool)
    key_mask[0, 8:] = False  # right
    key_mask[1, :3] = False  # left
    with torch.no_grad():
        y = m(x, Ctx(mask=key_mask))
        for bb, rows in ((0, slice(0, 8)), (1, slice(3, 11))):
            ref = reference(m, x[bb:bb + 1], 0.6, 4, causal, key_mask[bb:bb + 1])
            assert (y[bb, rows] - ref[0, rows]).abs().max().item() < 1e-10
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("causal, learn_R", [(False, True), (True, True), (True, False)])
def test_gradients_match_finite_differences(causal, learn_R):
    """The recomputing backward (q, k, v through the projections, and R) against torch's gradcheck."""
    m, _, _ = make_op("mha", "fourier_integral", d=16, causal=causal, heads=2, kv_heads=1, block=3, learn_R=learn_R)
    perturb_params(m)
    with torch.no_grad():
        m.R.fill_(0.8)
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x, Ctx()), (x,), eps=1e-6, atol=1e-7)
    assert isinstance(m.R, torch.nn.Parameter) == learn_R
    if learn_R:
        m(x, Ctx()).square().sum().backward()
        g = m.R.grad.item()
        with torch.no_grad():
            e = 1e-6
            m.R += e
            up = m(x, Ctx()).square().sum()
            m.R -= 2 * e
            down = m(x, Ctx()).square().sum()
        assert abs(g - (up - down).item() / (2 * e)) < 1e-6 * max(abs(g), 1.0)


@pytest.mark.parametrize("causal", [False, True])
def test_plain_form_equals_tiled(causal):
    """The export's form (every score at once) equals the tiled kernel, with GQA and (bidirectional) padding."""
    m, _, _ = make_op("mha", "fourier_integral", d=D, causal=causal, heads=4, kv_heads=2, block=4)
    perturb_params(m)
    with torch.no_grad():
        m.R.fill_(0.5)
    x = torch.randn(2, 10, D, dtype=torch.float64)
    key_mask = torch.arange(10)[None, :] < torch.tensor([[10], [7]])
    for mask in (None, key_mask):
        with torch.no_grad():
            q, k, v = m._heads(x)
            want, got = m(x, Ctx(mask=mask)), m._plain(q, k, v, Ctx(mask=mask))
            real = mask[..., None] if mask is not None else 1
            assert ((want - got) * real).abs().max().item() < 1e-12


def test_zero_R_is_the_mean_of_the_values():
    """R = 0: every sinc is 1, the weights uniform: o_i is the mean of v over the keys it reads."""
    m, _, _ = make_op("mha", "fourier_integral", d=D, causal=True, heads=4, block=3)
    perturb_params(m)
    with torch.no_grad():
        m.R.zero_()
        x = torch.randn(1, 8, D, dtype=torch.float64)
        _, _, v = head_projections(m, x)
        mean = v.cumsum(1) / torch.arange(1, 9, dtype=x.dtype)[None, :, None, None]
        want = output_projection(m, mean.repeat_interleave(1, 2).reshape(1, 8, -1))
        assert (m(x, Ctx()) - want).abs().max().item() < 1e-12


def test_causal_does_not_leak_and_bidirectional_does():
    m, _, _ = make_op("mha", "fourier_integral", d=D, causal=True, heads=4, kv_heads=2, block=5)
    perturb_params(m)
    with torch.no_grad():
        m.R.fill_(0.5)
        assert_no_leak(lambda x: m(x, Ctx()), n=23, d=D)
    m, _, _ = make_op("mha", "fourier_integral", d=D, causal=False, heads=4, block=5)
    with torch.no_grad(), pytest.raises(AssertionError, match="changed by"):
        assert_no_leak(lambda x: m(x, Ctx()), n=12, d=D)


@pytest.mark.parametrize("args, message", [
    ("power=3", "power=3 is odd"),
    ("dropout=0.1", "no dropout"),
    ("block=0", "block"),
])
def test_refusals(args, message):
    with pytest.raises(EvoError, match=message):
        evodsl.parse(f"model m(causal=true) = input(features, d=32) -> mha(fourier_integral, {args}) "
                     f"-> head(linear, d_out=2)")


def test_position_schemes_inside_are_refused():
    with pytest.raises(EvoError, match="rope"):
        evodsl.parse("model m(causal=true) = input(features, d=32) -> pos(rope) -> mha(fourier_integral) "
                     "-> head(linear, d_out=2)")
