"""residual(skipinit) against De & Smith's equation x_{i+1} = x_i + alpha_i F(x_i), alpha_i(0) = 0, in float64; and
that it is rezero's declaration under another name (one op declared once), not a copy."""
from __future__ import annotations

import pytest
import torch

import evodsl
from evodsl.diagnostics import EvoError
from evodsl.ops import load_all, lookup
from ophelpers import make_op, perturb_params

D = 24
TOP = "d_model = 16\nheads = 2\n"


def _t(seed: int, shape=(3, 7, D)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_skipinit_is_rezeros_declaration():
    load_all()
    a, b = lookup("residual", "skipinit"), lookup("residual", "rezero")
    assert (a.params, a.module, a.cost) == (b.params, b.module, b.cost)
    assert "2002.10444" in a.paper and "2003.04887" in b.paper


@pytest.mark.parametrize("shape", [(3, 7, D), (1, 1, D), (2, 5, D)])
def test_skipinit_matches_equation(shape):
    m, _, _ = make_op("residual", "skipinit", d=D)
    x, fx = _t(1, shape), _t(2, shape)
    torch.testing.assert_close(x + m(fx), x, rtol=0, atol=0)  # the block is the identity at init
    perturb_params(m)
    alpha = float(m.alpha.detach())
    ref = torch.empty_like(x)
    for i in range(shape[0]):
        for t in range(shape[1]):
            ref[i, t] = x[i, t] + alpha * fx[i, t]
    torch.testing.assert_close(x + m(fx), ref, rtol=1e-12, atol=1e-12)


def test_skipinit_in_a_model_is_the_identity_at_init_and_learns_alpha():
    src = TOP + "model m = input(features, d=16) -> residual(norm -> ffn, scale=skipinit) -> head(linear, d_out=3)\n"
    m = evodsl.compile(src).double()
    x = _t(3, (2, 5, 16))
    scale = dict(m.named_parameters())["scale.alpha"]
    ref = m.head(x, None)
    torch.testing.assert_close(m(x), ref, rtol=1e-12, atol=1e-12)
    m(x).sum().backward()
    assert scale.grad is not None and scale.grad.abs() > 0


def test_skipinit_bad_init_is_an_evo_error():
    with pytest.raises(EvoError, match=r"init.*residual\(skipinit\)"):
        evodsl.parse(TOP + "model m = input(features, d=16) -> residual(ffn, scale=skipinit, init=11)\n")
