"""mha(mgk, form=linear) against Transformer-MGK's linear form, in float64, written with loops from the projections'
weights: h_i = sum_j sum_r pi_r phi(q_i).phi(k_jr) v_j / (sum_j sum_r pi_r phi(q_i).phi(k_jr) + eps), phi(x) = elu(x)
+ 1 elementwise (as x + 1 or exp(x) here), j over every token or j <= i (causal); one to three components, grouped and
single K/V heads, n across several chunks of the causal form, padding either side. With r = 1 it is mha(linear).
Decoding: tests/test_decode.py (MGK); the leak test, ONNX and growth below."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl import EvoError, parse
from evodsl.ops import Ctx
from ophelpers import assert_no_leak, head_projections, make_op, output_projection, perturb_params, spec_onnx_parity

D = 32
EPS = 1e-6


def phi(x):
    return torch.where(x > 0, x + 1, torch.exp(x))


def reference(m, x, causal, mask=None):
    q, k, v = head_projections(m, x)
    b, n, h, dh = q.shape
    kv, r = k.shape[2], m.r
    g = h // kv
    keys = [k]
    if r > 1:
        extra = (x @ m.k_extra.weight.T + (0 if m.k_extra.bias is None else m.k_extra.bias)).view(b, n, r - 1, kv, dh)
        keys += [extra[:, :, c] for c in range(r - 1)]
    pi = [[math.exp(float(a)) for a in row] for row in m.mix_logit]
    pi = [[a / sum(row) for a in row] for row in pi]
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        for i in range(n):
            js = [j for j in (range(i + 1) if causal else range(n)) if mask is None or mask[bb, j]]
            for hh in range(h):
                kh = hh // g
                num, den = torch.zeros(dh, dtype=x.dtype), 0.0
                for j in js:
                    w = sum(pi[kh][c] * float(phi(q[bb, i, hh]) @ phi(keys[c][bb, j, kh])) for c in range(r))
                    num, den = num + w * v[bb, j, kh], den + w
                out[bb, i, hh] = num / (den + EPS)
    return output_projection(m, out.reshape(b, n, h * dh))


CASES = [(2, None, 13), (3, 2, 11), (1, 1, 9), (2, 1, 4)]  # components, kv_heads, n (chunks of 5: n no multiple)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("r, kv_heads, n", CASES)
def test_linear_mgk_matches_equation(causal, r, kv_heads, n):
    m, _, _ = make_op("mha", "mgk", d=D, causal=causal, heads=4, kv_heads=kv_heads, components=r, form="linear")
    m.chunk = 5
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference(m, x, causal)
    assert (y - ref).abs().max().item() < 1e-10 * ref.abs().max().item()


@pytest.mark.parametrize("causal", [False, True])
def test_one_component_is_linear_attention(causal):
    m, _, _ = make_op("mha", "mgk", d=D, causal=causal, heads=4, kv_heads=2, components=1, form="linear")
    lin, _, _ = make_op("mha", "linear", d=D, causal=causal, heads=4, kv_heads=2)
    perturb_params(m)
    lin.load_state_dict({k: v for k, v in m.state_dict().items() if k != "mix_logit"})
    x = torch.randn(2, 70, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        want = lin(x, Ctx())
        assert (m(x, Ctx()) - want).abs().max().item() < 1e-10 * want.abs().max().item()


@pytest.mark.parametrize("causal", [False, True])
def test_padding_either_side(causal):
    m, _, _ = make_op("mha", "mgk", d=D, causal=causal, heads=4, kv_heads=2, components=2, form="linear")
    m.chunk = 4
    perturb_params(m)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 12, D, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, :5], mask[1, 9:] = False, False  # left, right
    x[~mask] = torch.randn(int((~mask).sum()), D, generator=g, dtype=torch.float64) * 5  # padding is noise
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        assert torch.isfinite(y).all()
        ref = reference(m, x, causal, mask)
        assert ((y - ref)[mask]).abs().max().item() < 1e-10 * ref.abs().max().item()
        for row, cut in ((0, slice(5, 12)), (1, slice(0, 9))):
            alone = m(x[row:row + 1, cut], Ctx())
            assert (y[row:row + 1, cut] - alone).abs().max().item() < 1e-10 * alone.abs().max().item()
        if not causal:  # the control: unmasked, the padding reaches the real outputs
            assert (m(x, Ctx())[1, :9] - y[1, :9]).abs().max().item() > 1e-6


def test_causal_linear_mgk_never_leaks():
    m, _, _ = make_op("mha", "mgk", d=D, causal=True, heads=4, kv_heads=2, components=2, form="linear")
    m.chunk = 16
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=70, d=D)


def test_gradients_are_the_equations():
    m, _, _ = make_op("mha", "mgk", d=8, causal=True, heads=2, kv_heads=1, components=2, form="linear")
    m.chunk = 3
    perturb_params(m, scale=0.3)
    x = torch.randn(1, 7, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x, Ctx()), (x,))


def test_bad_form_is_refused():
    with pytest.raises(EvoError, match="form"):
        parse("model m(causal=true) = input(features, d=32) -> mha(mgk, heads=4, form=cubic) -> head(linear, d_out=2)")


@pytest.mark.parametrize("causal", [True, False])
def test_linear_mgk_onnx_matches_torch(causal, tmp_path):
    """One file (a symbolic n: the causal form's prefix sums) that onnxruntime runs at 3 lengths and 2 batch sizes as
    torch does (past the 64-token chunks), a right-padded row when bidirectional."""
    src = (f"model m(causal={str(causal).lower()}) = input(features, d=32) -> norm -> "
           f"mha(mgk, form=linear, components=2, heads=4, kv_heads=2) -> head(linear, d_out=8)")
    worst = spec_onnx_parity(src, tmp_path, pad=0 if causal else 3)
    print(f"linear MGK ONNX parity, causal={causal}: max |ORT - torch| / scale = {worst:.2e}")


@pytest.mark.parametrize("causal", [True, False])
def test_linear_mgk_grows_as_declared(causal):
    """tests/growth.py's harness for form=linear (test_growth.py keys its row by variant: the softmax form there)."""
    from growth import check_growth, mha_growth

    got, flops, peak, bwd = mha_growth("mgk", causal, form="linear", components=2)
    check_growth(f"mha(mgk, form=linear) {'causal' if causal else 'bidirectional'}", got, flops, peak, bwd)
