"""Every norm against its defining equation, computed here in float64 from plain tensor math."""
from __future__ import annotations

import math

import pytest
import torch

from ophelpers import make_op, perturb_params

D = 48


def _x(seed: int = 3, shape=(2, 5, D)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.7


def ref_layernorm(x, g, b, eps):
    mu = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mu) ** 2).sum(-1, keepdim=True) / x.shape[-1]  # biased variance, as in the paper
    return (x - mu) / (var + eps).sqrt() * g + (0 if b is None else b)


def ref_rmsnorm(x, g, eps):
    return x / ((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps).sqrt() * g


def ref_scalenorm(x, g, eps):
    length = (x * x).sum(-1, keepdim=True).sqrt()
    return g * x / torch.where(length > eps, length, torch.full_like(length, eps))


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_equation(bias):
    m, p, _ = make_op("norm", "layernorm", d=D, bias=bias, eps=1e-3)
    perturb_params(m)
    x = _x()
    torch.testing.assert_close(m(x), ref_layernorm(x, m.weight, m.bias, 1e-3), rtol=1e-10, atol=1e-10)
    assert (m.bias is None) == (not bias)


@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_rmsnorm_matches_equation(eps):
    m, p, _ = make_op("norm", "rmsnorm", d=D, eps=eps)
    perturb_params(m)
    x = _x()
    torch.testing.assert_close(m(x), ref_rmsnorm(x, m.weight, eps), rtol=1e-10, atol=1e-10)


def test_rmsnorm_offset_gain():
    """Gemma's parametrisation: the gain is 1 + w, w starting at 0; the function is RMSNorm's."""
    m, p, _ = make_op("norm", "rmsnorm", d=D, offset=1.0)
    assert torch.equal(m.weight, torch.zeros(D, dtype=torch.float64))
    perturb_params(m)
    x = _x()
    torch.testing.assert_close(m(x), ref_rmsnorm(x, 1 + m.weight, 1e-6), rtol=1e-10, atol=1e-10)


def test_rmsnorm_defaults_and_params():
    m, p, _ = make_op("norm", "rmsnorm", d=D)
    assert p.eps == 1e-6
    assert [n for n, _ in m.named_parameters()] == ["weight"]  # g only, no bias
    assert torch.equal(m.weight, torch.ones(D, dtype=torch.float64))


def test_rmsnorm_does_not_recentre():
    # RMSNorm and LayerNorm differ exactly by the mean: a shifted input tells them apart.
    x = _x()
    rms, _, _ = make_op("norm", "rmsnorm", d=D, eps=1e-6)
    ln, _, _ = make_op("norm", "layernorm", d=D, eps=1e-6, bias=False)
    assert (rms(x) - ln(x)).abs().max() > 1e-2
    xc = x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(rms(xc), ln(xc), rtol=1e-8, atol=1e-8)


def test_scalenorm_init_is_sqrt_d():
    for d in (16, 48, 512):
        m, _, _ = make_op("norm", "scalenorm", d=d)
        params = list(m.parameters())
        assert len(params) == 1 and params[0].numel() == 1  # one scalar g
        assert m.scale.item() == pytest.approx(math.sqrt(d), rel=1e-7)  # built in float32, then cast


def test_scalenorm_matches_equation():
    m, p, _ = make_op("norm", "scalenorm", d=D)
    assert p.eps == 1e-5
    x = _x()
    torch.testing.assert_close(m(x), ref_scalenorm(x, m.scale, p.eps), rtol=1e-10, atol=1e-10)
    perturb_params(m)
    torch.testing.assert_close(m(x), ref_scalenorm(x, m.scale, p.eps), rtol=1e-10, atol=1e-10)
    # every output token has length |g|
    torch.testing.assert_close(m(x).norm(dim=-1), m.scale.abs().expand(2, 5), rtol=1e-10, atol=1e-10)


def test_scalenorm_eps_floor():
    m, p, _ = make_op("norm", "scalenorm", d=D, eps=0.1)
    x = _x() * 1e-4  # ||x|| < eps: divided by eps, not by ||x||
    assert (x.norm(dim=-1) < 0.1).all()
    torch.testing.assert_close(m(x), m.scale * x / 0.1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m(x), ref_scalenorm(x, m.scale, 0.1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", ["rmsnorm", "scalenorm"])
def test_eps_must_be_positive(variant):
    from pydantic import ValidationError
    with pytest.raises(ValidationError):
        make_op("norm", variant, d=D, eps=0.0)
