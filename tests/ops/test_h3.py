"""ssm(h3) against the paper's layer (Fu et al. 2022, Alg. 1), in float64, written here token by token from the
module's weights: q, k, v; the shift SSM as its recurrence (a register of the last s values of k, x_t = sum_l C_l
reg_l, plus D^k k_t); per head the outer product k~ v^T; the diagonal SSM as its recurrence (h_t = dA h_{t-1} +
kv_t, y_t = 2 Re(C B_bar . h_t) + D kv_t); o = q . y; W_o. The step form equals the forward piece by piece with a
constant state."""
from __future__ import annotations

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_no_leak, assert_padded_row_alone, decode_in_pieces, make_op, perturb_params

D = 8


def lin(layer, x):
    return x @ layer.weight.T + layer.bias


def reference(m, u):
    b, n, d = u.shape
    dh, H, s = m.dh, m.H, m.s
    q, k, v = lin(m.q, u), lin(m.k, u), lin(m.v, u)  # [b, n, d], channel h dh + i
    kern = m.kernel
    A = -torch.exp(kern.log_A_real) + 1j * kern.A_imag
    dA = torch.exp(torch.exp(kern.log_dt)[:, None] * A)  # [H, M]
    CB = (kern.C[0, ..., 0] + 1j * kern.C[0, ..., 1]) * (dA - 1) / A
    reg = torch.zeros(b, d, s, dtype=u.dtype)  # reg[..., l] = k_{t-l}
    h = torch.zeros(b, dh, dh, H, A.shape[1], dtype=torch.complex128)
    out = []
    for t in range(n):
        reg = torch.cat((k[:, t, :, None], reg[..., :-1]), -1)
        ks = (m.shift_C * reg).sum(-1) + m.shift_D * k[:, t]  # [b, d]
        kh, vh, qh = ks.reshape(b, H, dh), v[:, t].reshape(b, H, dh), q[:, t].reshape(b, H, dh)
        kv = torch.einsum("bhi,bhj->bijh", kh, vh)
        h = dA * h + kv[..., None]
        y = 2 * (CB * h).sum(-1).real + m.D * kv  # [b, i, j, H]
        o = torch.einsum("bhi,bijh->bjh", qh, y).reshape(b, dh * H)
        out.append(lin(m.o, o))
    return torch.stack(out, 1)


ARGS = [{"N": 8, "shift": 4}, {"N": 4, "shift": 1}, {"N": 6, "shift": 3, "head_dim": 2}, {"N": 2, "shift": 5, "head_dim": 4}]


@pytest.mark.parametrize("args", ARGS, ids=[str(i) for i in range(len(ARGS))])
@pytest.mark.parametrize("n", [1, 6, 29])
def test_h3_matches_the_recurrence(args, n):
    m, _, _ = make_op("ssm", "h3", d=D, causal=True, **args)
    perturb_params(m)
    x = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want, got = reference(m, x), m(x, Ctx())
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()


@pytest.mark.parametrize("args", ARGS[::2], ids=["heads1", "heads2"])
def test_causal_does_not_leak_and_decodes_with_a_constant_state(args):
    from costhelpers import declared

    m, _, _ = make_op("ssm", "h3", d=D, causal=True, **args)
    perturb_params(m)
    x = torch.randn(2, 30, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_no_leak(lambda t: m(t, Ctx()), n=20, d=D)
        want = m(x, Ctx())
        for sizes in ((5, 1, 3, 1, 20), (1,) * 30, (30,)):
            y, _ = decode_in_pieces(m, x, sizes)
            assert (y - want).abs().max().item() <= 1e-10 * want.abs().max().item()
        for t in (1, 4, 30):
            _, state = decode_in_pieces(m, x[:, :t], (1,) * t)
            _, _, cost, ev = declared("ssm", "h3", 2, t, dtype=torch.float64, d=D, causal=True, **args)
            assert state.nbytes() == ev(cost.cache) == 2 * (D * (m.s - 1) + m.dh ** 2 * m.H * args["N"]) * 8


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_enters_neither_state(side):
    m, _, _ = make_op("ssm", "h3", d=D, causal=True, N=4, shift=3, head_dim=2)
    perturb_params(m)
    assert_padded_row_alone(m, side, d=D)


def test_validation():
    base = "vocab = 50\nd_model = 32\nmodel m(causal=true) = input(tokens) -> embed(token) -> norm -> ssm(h3{a}) -> norm -> head(lm)\n"
    evodsl.parse(base.format(a=", N=8, shift=4, head_dim=8"))
    with pytest.raises(EvoError, match="does not divide"):
        evodsl.parse(base.format(a=", head_dim=5"))
    with pytest.raises(EvoError, match="conjugate pairs"):
        evodsl.parse(base.format(a=", N=3"))
    for bad in ("N=0", "shift=0", "head_dim=0"):
        with pytest.raises(EvoError, match=bad.split("=")[0]):
            evodsl.parse(base.format(a=", " + bad))
