"""ssm(bigs) against the paper's layer (Wang et al. 2022, Sec. 3, Fig. 2), in float64, written here from the module's
weights: V = GELU(W_v X), F = GELU(W_f X), B = GELU(W_b Flip(X)), each S4 run as its recurrence token by token
(h_t = dA h_{t-1} + x_t, y_t = 2 Re(C B_bar . h_t) + D x_t, ZOH from A = -exp(log_A_real) + i A_imag), U =
GELU(W_u (U_l * Flip(U_r))), O = W_o (U * V). Bidirectional only: causal=true is refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_padding_either_side, make_op, perturb_params

D = 8


def s4(kernel, Dskip, x):
    """x [b, n, d] -> [b, n, d], the S4D recurrence."""
    A = -torch.exp(kernel.log_A_real) + 1j * kernel.A_imag
    dA = torch.exp(torch.exp(kernel.log_dt)[:, None] * A)
    CB = (kernel.C[0, ..., 0] + 1j * kernel.C[0, ..., 1]) * (dA - 1) / A
    h = torch.zeros(x.shape[0], x.shape[2], A.shape[1], dtype=torch.complex128)
    ys = []
    for t in range(x.shape[1]):
        h = dA * h + x[:, t, :, None]
        ys.append(2 * (CB * h).sum(-1).real + Dskip * x[:, t])
    return torch.stack(ys, 1)


def lin(layer, x):
    return x @ layer.weight.T + layer.bias


def reference(m, X, mask=None):
    keep = torch.ones(X.shape[:2], dtype=X.dtype) if mask is None else mask.to(X.dtype)
    V = F.gelu(lin(m.v, X))
    Fw = F.gelu(lin(m.f, X)) * keep[..., None]
    B = F.gelu(lin(m.b, X.flip(1))) * keep.flip(1)[..., None]
    U = F.gelu(lin(m.u, s4(m.kernel_f, m.D_f, Fw) * s4(m.kernel_b, m.D_b, B).flip(1)))
    return lin(m.o, U * V)


@pytest.mark.parametrize("args", [{"N": 8}, {"N": 2, "expand": 1}], ids=["N8", "N2"])
@pytest.mark.parametrize("n", [1, 6, 37])
def test_bigs_matches_the_papers_layer(args, n):
    m, _, _ = make_op("ssm", "bigs", d=D, causal=False, **args)
    perturb_params(m)
    x = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want, got = reference(m, x), m(x, Ctx())
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()


def test_both_directions_are_read():
    m, _, _ = make_op("ssm", "bigs", d=D, causal=False, N=4)
    perturb_params(m)
    x = torch.randn(1, 10, D, dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        for t in (0, 9):  # a change at either end reaches the other end
            x2 = x.clone()
            x2[:, t] += 1.0
            assert (m(x2, Ctx())[:, 9 - t] - y[:, 9 - t]).abs().max() > 1e-6


def test_padding_either_side():
    m, _, _ = make_op("ssm", "bigs", d=D, causal=False, N=4)
    perturb_params(m)
    assert_padding_either_side(m, lambda x, mask: reference(m, x, mask), both_rows=True, d=D)


def test_validation():
    base = "vocab = 50\nd_model = 32\nmodel m(causal={c}) = input(tokens) -> embed(token) -> norm -> ssm(bigs{a}) -> norm -> head(lm)\n"
    evodsl.parse(base.format(c="false", a=", N=8, expand=2"))
    with pytest.raises(EvoError, match="ssm\\(bigs\\) has no causal form"):
        evodsl.parse(base.format(c="true", a=""))
    with pytest.raises(EvoError, match="conjugate pairs"):
        evodsl.parse(base.format(c="false", a=", N=5"))
    for bad in ("N=0", "expand=0"):
        with pytest.raises(EvoError, match=bad.split("=")[0]):
            evodsl.parse(base.format(c="false", a=", " + bad))
