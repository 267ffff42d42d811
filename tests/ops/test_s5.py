"""ssm(s5) against the paper's equations (Smith et al. 2023, Sections 3 and 4), in complex128, written here token by
token from the module's parameters: Lambda = -exp(lambda_log) + i lambda_im, zero-order hold Lambda_bar =
exp(Lambda Delta), B_bar = (Lambda_bar - 1) / Lambda B~, x_t = Lambda_bar x_{t-1} + B_bar u_t, y_t = Re(C~ x_t) + D u_t.
The chunked scan equals it at every chunk size; the step form equals the forward piece by piece with a state of
constant size; the init is the diagonalised HiPPO-N, block by block."""
from __future__ import annotations

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_decodes_with_constant_state, assert_every_parameter_learns, assert_padded_row_alone, make_op, perturb_params

D = 16


def reference(m, u):
    lam = -torch.exp(m.lambda_log) + 1j * m.lambda_im
    lam_bar = torch.exp(lam * torch.exp(m.log_step))
    B = ((lam_bar - 1) / lam)[:, None] * torch.complex(m.B_re, m.B_im)
    C = torch.complex(m.C_re, m.C_im)
    x = torch.zeros(u.shape[0], m.N, dtype=torch.complex128)
    ys = []
    for t in range(u.shape[1]):
        x = lam_bar * x + u[:, t].to(torch.complex128) @ B.T
        ys.append((x @ C.T).real + m.D * u[:, t])
    return torch.stack(ys, 1)


def perturbed(**args):
    m, _, _ = make_op("ssm", "s5", d=D, causal=True, **args)
    perturb_params(m, scale=0.5)
    with torch.no_grad():  # timescales of order 1, so that the states mix over a few tokens
        m.log_step.copy_(torch.randn(m.N, dtype=torch.float64) * 0.3)
    return m


@pytest.mark.parametrize("args", [{}, {"P": 6, "chunk": 4, "blocks": 2}, {"P": 3, "chunk": 1}, {"P": 8, "chunk": 7, "blocks": 4}],
                         ids=["default", "P6-T4", "T1", "T7"])
@pytest.mark.parametrize("n", [1, 6, 37])
def test_s5_matches_the_recurrence(args, n):
    m = perturbed(**args)
    u = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want, got = reference(m, u), m(u, Ctx())
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()


@pytest.mark.parametrize("blocks", [1, 4])
def test_init_is_the_diagonalised_hippo_n(blocks):
    """Re(Lambda) = -1/2; each block's V diag(Lambda) V^H is the normal part of HiPPO-LegS, built here from its
    definition; the timescales lie in [dt_min, dt_max]."""
    P = 16
    m, _, _ = make_op("ssm", "s5", d=D, causal=True, P=P, blocks=blocks)
    lam = -torch.exp(m.lambda_log) + 1j * m.lambda_im
    assert torch.allclose(lam.real, torch.full((P,), -0.5, dtype=lam.real.dtype))
    k = P // blocks
    A = torch.zeros(k, k, dtype=torch.float64)
    for i in range(k):
        for j in range(k):
            legs = -((2 * i + 1) * (2 * j + 1)) ** 0.5 if i > j else (-(i + 1) if i == j else 0.0)
            A[i, j] = legs + ((i + 0.5) * (j + 0.5)) ** 0.5
    from evodsl.ops.ssm.s5 import hippo_n
    lam_b, V = hippo_n(k)
    assert torch.allclose(V @ torch.diag(lam_b) @ V.conj().T, A.to(torch.complex128), atol=1e-10)
    assert torch.allclose(lam[:k].to(torch.complex128), lam_b, atol=1e-5) and torch.equal(lam[:k], lam[-k:])
    step = torch.exp(m.log_step)
    assert step.min() >= 0.001 * (1 - 1e-6) and step.max() <= 0.1 * (1 + 1e-6)


def test_decodes_in_pieces_with_a_constant_state():
    m = perturbed(P=6, chunk=4)
    nbytes = assert_decodes_with_constant_state(m, "ssm", "s5", D, {"P": 6, "chunk": 4})
    assert nbytes[0] == 2 * 2 * 6 * 8


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_enters_no_state(side):
    assert_padded_row_alone(perturbed(P=6, chunk=4), side, d=D)


def test_every_parameter_learns():
    assert_every_parameter_learns(perturbed(P=6, chunk=4), d=D)


def test_validation():
    base = "vocab = 50\nd_model = 32\nmodel m(causal={c}) = input(tokens) -> embed(token) -> norm -> ssm(s5{a}) -> norm -> head(lm)\n"
    evodsl.parse(base.format(c="true", a=", P=8, blocks=2"))
    with pytest.raises(EvoError, match="causal only"):
        evodsl.parse(base.format(c="false", a=""))
    with pytest.raises(EvoError, match="not a multiple of blocks"):
        evodsl.parse(base.format(c="true", a=", P=8, blocks=3"))
    with pytest.raises(EvoError, match="dt_min"):
        evodsl.parse(base.format(c="true", a=", dt_min=0.5, dt_max=0.1"))
    for bad in ("P=0", "chunk=0", "blocks=0", "dt_min=0.0"):
        with pytest.raises(EvoError, match=bad.split("=")[0]):
            evodsl.parse(base.format(c="true", a=", " + bad))
