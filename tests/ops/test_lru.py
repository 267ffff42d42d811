"""ssm(lru) against the paper's recurrence (Orvieto et al. 2023, Section 3), in complex128, written here token by
token from the module's parameters: lam = exp(-exp(nu) + i exp(theta)), x_t = lam x_{t-1} + exp(gamma_log) (B u_t),
y_t = Re(C x_t) + D u_t. The chunked scan equals it at every chunk size; the step form equals the forward piece by
piece with a state of constant size; the ring initialisation holds."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_decodes_with_constant_state, assert_every_parameter_learns, assert_padded_row_alone, make_op, perturb_params

D = 16


def reference(m, u):
    lam = torch.exp(-torch.exp(m.nu_log) + 1j * torch.exp(m.theta_log))
    B = torch.exp(m.gamma_log)[:, None] * torch.complex(m.B_re, m.B_im)
    C = torch.complex(m.C_re, m.C_im)
    x = torch.zeros(u.shape[0], m.N, dtype=torch.complex128)
    ys = []
    for t in range(u.shape[1]):
        x = lam * x + u[:, t].to(torch.complex128) @ B.T
        ys.append((x @ C.T).real + m.D * u[:, t])
    return torch.stack(ys, 1)


def perturbed(**args):
    m, _, _ = make_op("ssm", "lru", d=D, causal=True, **args)
    perturb_params(m, scale=0.3)
    with torch.no_grad():  # decays inside the unit circle, off their init
        m.nu_log.copy_(torch.log(torch.rand(m.N, dtype=torch.float64) * 0.5 + 0.01))
    return m


@pytest.mark.parametrize("args", [{}, {"N": 5, "chunk": 4}, {"N": 3, "chunk": 1}, {"N": 7, "chunk": 7}],
                         ids=["default", "n5-T4", "T1", "T7"])
@pytest.mark.parametrize("n", [1, 6, 37])
def test_lru_matches_the_recurrence(args, n):
    m = perturbed(**args)
    u = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want, got = reference(m, u), m(u, Ctx())
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()


def test_ring_initialisation():
    """|lam| on the ring [r_min, r_max], phases in [0, max_phase], gamma = sqrt(1 - |lam|^2)."""
    m, _, _ = make_op("ssm", "lru", d=D, causal=True, N=256, r_min=0.5, r_max=0.8, max_phase=1.0)
    mod, phase = torch.exp(-torch.exp(m.nu_log)), torch.exp(m.theta_log)
    assert mod.min() >= 0.5 - 1e-9 and mod.max() <= 0.8 + 1e-9 and phase.max() <= 1.0 + 1e-9
    assert torch.allclose(torch.exp(m.gamma_log), torch.sqrt(1 - mod ** 2))


def test_decodes_in_pieces_with_a_constant_state():
    m = perturbed(N=6, chunk=4)
    nbytes = assert_decodes_with_constant_state(m, "ssm", "lru", D, {"N": 6, "chunk": 4})
    assert nbytes[0] == 2 * 2 * 6 * 8


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_enters_no_state(side):
    assert_padded_row_alone(perturbed(N=6, chunk=4), side, d=D)


def test_every_parameter_learns():
    assert_every_parameter_learns(perturbed(N=6, chunk=4), d=D)


def test_validation():
    base = "vocab = 50\nd_model = 32\nmodel m(causal={c}) = input(tokens) -> embed(token) -> norm -> ssm(lru{a}) -> norm -> head(lm)\n"
    evodsl.parse(base.format(c="true", a=", N=8, r_min=0.5"))
    with pytest.raises(EvoError, match="causal only"):
        evodsl.parse(base.format(c="false", a=""))
    with pytest.raises(EvoError, match="r_min"):
        evodsl.parse(base.format(c="true", a=", r_min=0.99, r_max=0.9"))
    for bad in ("N=0", "chunk=0", "r_max=1.0", "max_phase=0.0"):
        with pytest.raises(EvoError, match=bad.split("=")[0]):
            evodsl.parse(base.format(c="true", a=", " + bad))
    assert math.isclose(evodsl.ops.lookup("ssm", "lru").params().max_phase, 0.314)
