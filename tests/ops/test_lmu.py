"""ssm(lmu) against the Legendre Memory Unit's equations (Voelker et al. 2019; the parallel form of Chilkuri and
Eliasmith 2021), in float64: A and B are the paper's closed forms; A_bar, B_bar their zero-order hold, checked here
through an eigendecomposition (A_bar = V exp(L / theta) V^-1, B_bar = A^-1 (A_bar - I) B); the parallel (FFT)
memory equals the recurrence m_t = A_bar m_{t-1} + B_bar u_t run token by token (1e-10) at several lengths, past the
impulse buffer too; h_t = tanh(W_x x_t + W_m m_t + b). Decoding equals the forward piece by piece with a flat state.
feedback=true against the 2019 cell run token by token from its equations (u_t = e_x x_t + e_h h_{t-1} + e_m m_{t-1},
m_t = A_bar m_{t-1} + B_bar u_t, h_t = tanh(W_x x_t + W_h h_{t-1} + W_m m_t + b)), with A_bar, B_bar from the
eigendecomposition (not the module's buffers); its state (m, h) is constant in the length."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import (assert_decodes_with_constant_state, assert_every_parameter_learns, assert_padded_row_alone,
                       decode_in_pieces, make_op, perturb_params)

D = 16


def closed_forms(q):
    A = np.zeros((q, q))
    for i in range(q):
        for j in range(q):
            A[i, j] = (2 * i + 1) * (-1.0 if i < j else (-1.0) ** (i - j + 1))
    B = np.array([(2 * i + 1) * (-1.0) ** i for i in range(q)])
    return A, B


def reference(m, x, q, units):
    b, n, _ = x.shape
    u = x @ m.u_proj.weight.T  # [b, n, units]
    Abar, Bbar = m.Abar, m.Bbar
    mem = torch.zeros(b, units, q, dtype=x.dtype)
    ms = []
    for t in range(n):
        mem = torch.einsum("ij,buj->bui", Abar, mem) + u[:, t, :, None] * Bbar
        ms.append(mem.reshape(b, -1))
    M = torch.stack(ms, 1)
    return torch.tanh(x @ m.x_proj.weight.T + m.x_proj.bias + M @ m.m_proj.weight.T)


def discretised(q, theta):
    """A_bar, B_bar by zero-order hold over one token, through an eigendecomposition of A / theta."""
    A, B = closed_forms(q)
    lam, V = np.linalg.eig(A / theta)
    Abar = (V @ np.diag(np.exp(lam)) @ np.linalg.inv(V)).real
    return Abar, np.linalg.solve(A, (Abar - np.eye(q)) @ B)


def feedback_reference(m, x, q, theta, units):
    """The 2019 cell token by token, in float64: one unit's memory m [q] per input unit, h [d]."""
    Abar, Bbar = (torch.from_numpy(t) for t in discretised(q, theta))
    ex, eh, em = m.u_proj.weight, m.e_h.weight, m.e_m.weight
    Wx, bx, Wh, Wm = m.x_proj.weight, m.x_proj.bias, m.h_proj.weight, m.m_proj.weight
    b, n, d = x.shape
    mem, h = torch.zeros(b, units, q, dtype=x.dtype), torch.zeros(b, d, dtype=x.dtype)
    hs = []
    for t in range(n):
        u = x[:, t] @ ex.T + h @ eh.T + mem.reshape(b, -1) @ em.T  # [b, units]
        mem = torch.stack([mem[:, k] @ Abar.T + u[:, k, None] * Bbar for k in range(units)], 1)
        h = torch.tanh(x[:, t] @ Wx.T + h @ Wh.T + mem.reshape(b, -1) @ Wm.T + bx)
        hs.append(h)
    return torch.stack(hs, 1)


@pytest.mark.parametrize("q,theta", [(1, 4.0), (6, 10.0), (12, 50.0)])
def test_a_and_b_are_the_closed_forms_discretised_by_zoh(q, theta):
    from evodsl.ops.ssm._lmu_memory import legendre

    A, B = closed_forms(q)
    At, Bt = legendre(q)
    assert np.array_equal(At.numpy(), A) and np.array_equal(Bt.numpy(), B)
    m, _, _ = make_op("ssm", "lmu", d=D, causal=True, order=q, theta=theta)
    Abar, Bbar = discretised(q, theta)
    assert np.abs(m.Abar.numpy() - Abar).max() <= 1e-10 * max(np.abs(Abar).max(), 1)
    assert np.abs(m.Bbar.numpy() - Bbar).max() <= 1e-10 * np.abs(Bbar).max()


ARGS = [{"order": 6, "theta": 10.0}, {"order": 4, "theta": 3.0, "units": 3, "max_len": 8}, {"order": 1, "theta": 1.5}]


@pytest.mark.parametrize("args", ARGS, ids=[str(i) for i in range(len(ARGS))])
@pytest.mark.parametrize("n", [1, 9, 37])
def test_the_parallel_memory_equals_the_recurrence(args, n):
    m, p, _ = make_op("ssm", "lmu", d=D, causal=True, **args)
    perturb_params(m)
    x = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want, got = reference(m, x, p.order, p.units), m(x, Ctx())
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()


FEEDBACK = [{"order": 6, "theta": 10.0, "feedback": True}, {"order": 4, "theta": 3.0, "units": 3, "feedback": True},
            {"order": 1, "theta": 1.5, "feedback": True}]


@pytest.mark.parametrize("args", FEEDBACK, ids=[str(i) for i in range(len(FEEDBACK))])
@pytest.mark.parametrize("n", [1, 9, 37])
def test_the_feedback_cell_equals_the_2019_equations(args, n):
    m, p, _ = make_op("ssm", "lmu", d=D, causal=True, **args)
    perturb_params(m)
    x = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want, got = feedback_reference(m, x, p.order, p.theta, p.units), m(x, Ctx())
        # the feedback is there: without e_h, e_m and W_h the cell gives other numbers
        for lin in (m.e_h, m.e_m, m.h_proj):
            lin.weight.zero_()
        plain = m(x, Ctx())
    assert want.abs().max().item() > 1e-2
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()
    if n > 1:
        assert (plain - want).abs().max().item() > 1e-3


def test_feedback_false_is_the_parallel_form_bit_for_bit():
    a, _, _ = make_op("ssm", "lmu", d=D, causal=True, order=6, theta=10.0, units=2)
    b, _, _ = make_op("ssm", "lmu", d=D, causal=True, order=6, theta=10.0, units=2, feedback=False)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 23, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(a(x, Ctx()), b(x, Ctx()))
    assert not hasattr(b, "e_h") and sum(t.numel() for t in a.parameters()) == sum(t.numel() for t in b.parameters())


@pytest.mark.parametrize("args", FEEDBACK[:2], ids=["default", "units"])
def test_the_feedback_cell_decodes_with_a_constant_state(args):
    m, p, _ = make_op("ssm", "lmu", d=D, causal=True, **args)
    perturb_params(m)
    nbytes = assert_decodes_with_constant_state(m, "ssm", "lmu", D, args)
    assert nbytes == [2 * (p.units * p.order + D) * 8] * 3  # m and h


@pytest.mark.parametrize("args", ARGS[:2], ids=["default", "units"])
def test_decodes_with_a_flat_state(args):  # (the leak check: SEQ_BUILD in tests/ops/test_leaks.py)
    from costhelpers import declared

    m, p, _ = make_op("ssm", "lmu", d=D, causal=True, **args)
    perturb_params(m)
    x = torch.randn(2, 30, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = m(x, Ctx())
        for sizes in ((5, 1, 3, 1, 20), (1,) * 30):
            y, _ = decode_in_pieces(m, x, sizes)
            assert (y - want).abs().max().item() <= 1e-10 * want.abs().max().item()
        for t in (1, 7):
            _, state = decode_in_pieces(m, x[:, :t], (1,) * t)
            _, _, cost, ev = declared("ssm", "lmu", 2, t, dtype=torch.float64, d=D, causal=True, **args)
            assert state.nbytes() == ev(cost.cache) == 2 * p.units * p.order * 8


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_enters_no_memory(side):
    m, _, _ = make_op("ssm", "lmu", d=D, causal=True, order=5, theta=6.0, units=2)
    perturb_params(m)
    assert_padded_row_alone(m, side, d=D)


@pytest.mark.parametrize("side", ["right", "left"])
def test_feedback_skips_padding(side):
    m, _, _ = make_op("ssm", "lmu", d=D, causal=True, order=5, theta=6.0, units=2, feedback=True)
    perturb_params(m)
    assert_padded_row_alone(m, side, d=D)


@pytest.mark.parametrize("feedback", [False, True])
def test_every_parameter_learns(feedback):
    m, _, _ = make_op("ssm", "lmu", d=D, causal=True, order=4, theta=8.0, feedback=feedback)
    assert_every_parameter_learns(m, d=D)


def test_validation():
    base = "vocab = 50\nd_model = 32\nmodel m(causal={c}) = input(tokens) -> embed(token) -> norm -> ssm(lmu{a}) -> norm -> head(lm)\n"
    evodsl.parse(base.format(c="true", a=", order=8, theta=16.0"))
    with pytest.raises(EvoError, match="causal only"):
        evodsl.parse(base.format(c="false", a=", order=8, theta=16.0"))
    for bad, pattern in ((", theta=4.0", "order"), (", order=4", "theta"), (", order=0, theta=4.0", "order"),
                         (", order=4, theta=0.0", "theta"), (", order=4, theta=4.0, units=0", "units")):
        with pytest.raises(EvoError, match=pattern):
            evodsl.parse(base.format(c="true", a=bad))
