"""residual(layerscale) against Touvron et al.'s equation x_{l+1} = x_l + diag(lambda) F(x_l), lambda in R^d,
lambda(0) = eps, in float64 on random inputs with perturbed lambda; its init parameter through residual(...)."""
from __future__ import annotations

import pytest
import torch

import evodsl
from evodsl.diagnostics import EvoError
from ophelpers import make_op, perturb_params

TOP = "d_model = 16\nheads = 2\n"


def _t(seed: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ref_layerscale(x, fx, lam):
    """x + diag(lambda) F(x), token by token: (diag(lambda) f)_c = lambda_c f_c."""
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        for t in range(x.shape[1]):
            out[i, t] = x[i, t] + torch.diag(lam) @ fx[i, t]
    return out


@pytest.mark.parametrize("d,shape,init", [(24, (3, 7), 1e-5), (8, (1, 1), 0.1), (16, (2, 5), 1e-6)])
def test_layerscale_matches_equation(d, shape, init):
    m, p, _ = make_op("residual", "layerscale", d=d, init=init)
    assert [n for n, _ in m.named_parameters()] == ["gamma"]
    assert torch.equal(m.gamma, torch.full((d,), init).double())  # built in float32, then cast
    x, fx = _t(1, (*shape, d)), _t(2, (*shape, d))
    torch.testing.assert_close(x + m(fx), ref_layerscale(x, fx, m.gamma.detach()), rtol=1e-12, atol=1e-12)
    perturb_params(m)
    torch.testing.assert_close(x + m(fx), ref_layerscale(x, fx, m.gamma.detach()), rtol=1e-12, atol=1e-12)


def test_layerscale_gradient_is_the_channel_sum():
    m, _, _ = make_op("residual", "layerscale", d=12)
    perturb_params(m)
    x, fx = _t(3, (2, 5, 12)), _t(4, (2, 5, 12))
    (x + m(fx)).sum().backward()  # d/dlambda_c sum(x + lambda f) = sum over tokens of f_c
    torch.testing.assert_close(m.gamma.grad, fx.sum((0, 1)), rtol=1e-12, atol=1e-12)


def test_layerscale_init_from_the_spec():
    src = TOP + ("model m = input(features, d=16) -> residual(norm -> mha, scale=layerscale, init=0.1)"
                 " -> residual(norm -> ffn, scale=layerscale) -> head(linear, d_out=3)\n")
    params = dict(evodsl.compile(src).named_parameters())
    assert torch.equal(params["scale1.gamma"], torch.full((16,), 0.1))
    assert torch.equal(params["scale2.gamma"], torch.full((16,), 1e-5))


@pytest.mark.parametrize("call,message", [
    ("residual(ffn, scale=layerscale, init=-1)", r"invalid value -1 for parameter 'init' of residual\(layerscale\)"),
    ("residual(ffn, scale=layerscale, eps=0.1)", r"unknown parameter 'eps' for residual\(layerscale\)"),
    ("residual(ffn, init=0.1)", r"unknown parameter 'init' for residual"),
])
def test_layerscale_errors(call, message):
    with pytest.raises(EvoError, match=message):
        evodsl.parse(TOP + f"model m = input(features, d=16) -> {call}\n")
