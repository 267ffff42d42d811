"""rnn(gilr) against the paper's recurrence (Martin and Cundy 2018, Section 4), in float64, written here token by
token from the module's weights: g = sigmoid(W_g x + b_g), z = tanh(W_z x + b_z), h_t = g_t h_{t-1} + (1 - g_t) z_t.
The chunked scan equals it at every chunk size; the step form equals the forward piece by piece with a state of
constant size. The GILR-LSTM (lstm=true) against its equations, token by token from the weights: h~ by the GILR
recurrence, f, i, o, z from x_t and h~_{t-1}, c_t = f_t c_{t-1} + i_t z_t, y_t = o_t c_t."""
from __future__ import annotations

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import (assert_decodes_with_constant_state, assert_every_parameter_learns, assert_padded_row_alone,
                       decode_in_pieces, make_op, perturb_params)

D = 16


def reference(m, x):
    W, bias = m.proj.weight, m.proj.bias
    h = torch.zeros(x.shape[0], D, dtype=x.dtype)
    hs = []
    for t in range(x.shape[1]):
        pre = x[:, t] @ W.T + (0 if bias is None else bias)
        g, z = torch.sigmoid(pre[:, :D]), torch.tanh(pre[:, D:])
        h = g * h + (1 - g) * z
        hs.append(h)
    return torch.stack(hs, 1)


def lstm_reference(m, x):
    """The GILR-LSTM token by token (the paper's equations), from the module's weights, in float64."""
    W, bias, U = m.proj.weight, m.proj.bias, m.recur.weight
    b, n, _ = x.shape
    ht, c = torch.zeros(b, D, dtype=x.dtype), torch.zeros(b, D, dtype=x.dtype)
    ys = []
    for t in range(n):
        pre = x[:, t] @ W.T + (0 if bias is None else bias)
        gates = pre[:, 2 * D:] + ht @ U.T  # U h~_{t-1} + V x_t + b
        f, i, o = (torch.sigmoid(gates[:, k * D:(k + 1) * D]) for k in range(3))
        z = torch.tanh(gates[:, 3 * D:])
        c = f * c + i * z
        ys.append(o * c)
        g, j = torch.sigmoid(pre[:, :D]), torch.tanh(pre[:, D:2 * D])
        ht = g * ht + (1 - g) * j  # h~_t, read by the next token's gates
    return torch.stack(ys, 1)


def perturbed(**args):
    m, _, _ = make_op("rnn", "gilr", d=D, causal=True, **args)
    perturb_params(m, scale=0.3)
    return m


@pytest.mark.parametrize("args", [{}, {"chunk": 4, "bias": False}, {"chunk": 1}, {"chunk": 7}], ids=["default", "T4", "T1", "T7"])
@pytest.mark.parametrize("n", [1, 6, 37])
def test_gilr_matches_the_recurrence(args, n):
    m = perturbed(**args)
    x = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want, got = reference(m, x), m(x, Ctx())
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()


@pytest.mark.parametrize("args", [{"lstm": True}, {"lstm": True, "chunk": 4, "bias": False}, {"lstm": True, "chunk": 7}],
                         ids=["default", "T4", "T7"])
@pytest.mark.parametrize("n", [1, 6, 37])
def test_gilr_lstm_matches_the_recurrence(args, n):
    m = perturbed(**args)
    x = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want, got = lstm_reference(m, x), m(x, Ctx())
    assert want.abs().max().item() > 1e-2  # a signal to compare
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()


def test_gilr_lstm_decodes_with_a_constant_state():
    assert assert_decodes_with_constant_state(perturbed(chunk=4, lstm=True), "rnn", "gilr", D,
                                              {"chunk": 4, "lstm": True}) == [2 * 2 * D * 8] * 3  # h~ and c


def test_decodes_in_pieces_with_a_constant_state():
    from costhelpers import declared

    m = perturbed(chunk=4)
    x = torch.randn(2, 30, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = m(x, Ctx())
        for sizes in ((5, 1, 3, 1, 20), (1,) * 30, (30,)):
            y, _ = decode_in_pieces(m, x, sizes)
            assert (y - want).abs().max().item() <= 1e-10 * want.abs().max().item()
        for t in (1, 4, 30):
            _, state = decode_in_pieces(m, x[:, :t], (1,) * t)
            _, _, cost, ev = declared("rnn", "gilr", 2, t, dtype=torch.float64, d=D, causal=True, chunk=4)
            assert state.nbytes() == ev(cost.cache) == 2 * D * 8


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_enters_no_state(side):
    assert_padded_row_alone(perturbed(chunk=4), side, d=D)


@pytest.mark.parametrize("side", ["right", "left"])
def test_gilr_lstm_padding_enters_no_state(side):
    assert_padded_row_alone(perturbed(chunk=4, lstm=True), side, d=D)


@pytest.mark.parametrize("args", [{"chunk": 4}, {"chunk": 4, "lstm": True}], ids=["gilr", "lstm"])
def test_every_parameter_learns(args):
    assert_every_parameter_learns(perturbed(**args), d=D)


def test_validation():
    base = "vocab = 50\nd_model = 32\nmodel m(causal={c}) = input(tokens) -> embed(token) -> norm -> rnn(gilr{a}) -> norm -> head(lm)\n"
    evodsl.parse(base.format(c="true", a=", chunk=8"))
    with pytest.raises(EvoError, match="causal only"):
        evodsl.parse(base.format(c="false", a=""))
    with pytest.raises(EvoError, match="chunk"):
        evodsl.parse(base.format(c="true", a=", chunk=0"))
