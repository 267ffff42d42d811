"""residual(admin) against Admin's equation (Liu et al. 2020) in float64:
x_i = LN(x_{i-1} * omega_i + F_i(x_{i-1})), omega_i in R^d learned; its init without the profiling pass,
omega_i(0) = sqrt(i) for the i-th sublayer of the stack (every variance term 1), across a repeat's copies
(encoder: 2 sublayers a layer, decoder: 3)."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl.diagnostics import EvoError
from evodsl.ops import Ctx
from ophelpers import make_op, perturb_params

TOP = "d_model = 16\nheads = 2\n"
D = 16


def _t(seed: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("params,i", [({}, 1), ({"sublayer": 2}, 2), ({"sublayer": 3, "per_layer": 3}, 3),
                                      ({"sublayer": 7}, 7)])
def test_admin_matches_equation(params, i):
    m, _, _ = make_op("residual", "admin", d=D, in_shapes=(("b", "n", D),) * 2, **params)
    assert torch.equal(m.omega, torch.full((D,), math.sqrt(i)).double())  # float32 at build, then cast
    perturb_params(m)
    for shape in [(2, 7, D), (1, 1, D)]:
        x, fx = _t(1, shape), _t(2, shape)
        ref = torch.empty_like(x)
        for b in range(shape[0]):
            for t in range(shape[1]):
                for c in range(D):
                    ref[b, t, c] = x[b, t, c] * m.omega[c] + fx[b, t, c]
        torch.testing.assert_close(m(fx, Ctx(), x), ref, rtol=1e-12, atol=1e-12)


def test_admin_block_is_post_ln_of_omega_x_plus_f():
    src = TOP + "model m = input(features, d=16) -> residual(mha, scale=admin) -> norm\n"
    m = evodsl.compile(src).double()
    perturb_params(m)
    x = _t(3, (2, 6, D))
    z = m.scale.omega * x + m.attn(x, Ctx())
    mu = z.mean(-1, keepdim=True)
    want = (z - mu) / torch.sqrt(((z - mu) ** 2).mean(-1, keepdim=True) + 1e-5) * m.norm.weight + m.norm.bias
    torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("per_layer", [2, 3])
def test_admin_init_counts_the_sublayers_across_a_repeat(per_layer):
    """Layer l's sublayer s starts at sqrt(per_layer * l + s): the authors' sqrt(2l + 1), sqrt(2l + 2) (encoder)."""
    body = " -> ".join(f"residual(ffn, scale=admin, sublayer={s}, per_layer={per_layer}) -> norm"
                       for s in range(1, per_layer + 1))
    m = evodsl.compile(TOP + f"model m = input(features, d=16) -> repeat({body}, 4)\n")
    got = {k: float(v[0]) for k, v in m.named_parameters() if k.endswith("omega")}
    assert len(got) == 4 * per_layer
    for l in range(4):
        for s in range(1, per_layer + 1):
            name = f"blocks.{l}.scale{s}.omega"
            assert got[name] == pytest.approx(math.sqrt(per_layer * l + s), rel=1e-6), name


def test_admin_errors():
    with pytest.raises(EvoError, match=r"invalid value 0 for parameter 'sublayer' of residual\(admin\)"):
        evodsl.parse(TOP + "model m = input(features, d=16) -> residual(ffn, scale=admin, sublayer=0)\n")
    with pytest.raises(EvoError, match=r"unknown parameter 'init' for residual\(admin\)"):
        evodsl.parse(TOP + "model m = input(features, d=16) -> residual(ffn, scale=admin, init=1)\n")
