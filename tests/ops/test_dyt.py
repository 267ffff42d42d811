"""norm(dyt) against Zhu et al.'s equation DyT(x) = gamma * tanh(alpha x) + beta, in float64, written element by
element; its init (alpha0, ones, zeros) and its errors."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl.diagnostics import EvoError
from ophelpers import make_op, perturb_params

TOP = "d_model = 16\nheads = 2\n"


def _t(seed: int, shape, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def ref_dyt(x, alpha, gamma, beta):
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        for t in range(x.shape[1]):
            for c in range(x.shape[2]):
                out[i, t, c] = gamma[c] * math.tanh(alpha * x[i, t, c]) + beta[c]
    return out


@pytest.mark.parametrize("d,shape,alpha0", [(12, (2, 5), 0.5), (8, (1, 1), 2.0), (16, (3, 3), 0.05)])
def test_dyt_matches_equation(d, shape, alpha0):
    m, _, _ = make_op("norm", "dyt", d=d, alpha0=alpha0)
    assert [n for n, _ in m.named_parameters()] == ["alpha", "weight", "bias"]
    assert m.alpha.item() == pytest.approx(alpha0, rel=1e-7)  # float32 at build, then cast
    assert torch.equal(m.weight, torch.ones(d, dtype=torch.float64)) and not m.bias.any()
    x = _t(1, (*shape, d), scale=3.0)  # well into tanh's saturation
    torch.testing.assert_close(m(x), ref_dyt(x, m.alpha.item(), m.weight, m.bias), rtol=1e-12, atol=1e-12)
    perturb_params(m)
    torch.testing.assert_close(m(x), ref_dyt(x, m.alpha.item(), m.weight, m.bias), rtol=1e-12, atol=1e-12)


def test_dyt_has_no_statistics():
    """Element-wise: a token's output does not depend on its other channels (a norm's would)."""
    m, _, _ = make_op("norm", "dyt", d=8)
    perturb_params(m)
    x = _t(2, (1, 2, 8))
    y = x.clone()
    y[..., 3:] *= 5.0
    torch.testing.assert_close(m(x)[..., :3], m(y)[..., :3], rtol=0, atol=0)


def test_dyt_in_place_of_layernorm():
    src = TOP + ("model m = input(features, d=16) -> norm(dyt) -> mha -> norm(dyt, alpha0=0.8) -> ffn"
                 " -> head(linear, d_out=3)\n")
    params = dict(evodsl.compile(src).named_parameters())
    assert params["norm1.alpha"].item() == 0.5 and params["norm2.alpha"].item() == pytest.approx(0.8)


@pytest.mark.parametrize("arg,message", [("alpha0=0", r"alpha0"), ("alpha0=-1", r"alpha0"), ("eps=1e-5", r"unknown")])
def test_dyt_errors(arg, message):
    with pytest.raises(EvoError, match=message):
        evodsl.parse(TOP + f"model m = input(features, d=16) -> norm(dyt, {arg}) -> mha\n")
