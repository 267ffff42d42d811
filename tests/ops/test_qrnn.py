"""rnn(qrnn) against the paper's equations (Bradbury et al. 2017, Section 2, fo-pooling), in float64, written here
token by token from the module's weights: the masked convolution tap by tap (position t reads x_{t-k+1} .. x_t, zeros
before the start), Z = tanh, F = sigmoid, O = sigmoid of its three parts, c_t = f_t c_{t-1} + (1 - f_t) z_t,
h_t = o_t c_t. The chunked scan equals it at every chunk size and window; the step form equals the forward piece by
piece with a state of constant size."""
from __future__ import annotations

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_decodes_with_constant_state, assert_every_parameter_learns, assert_padded_row_alone, make_op, perturb_params

D = 16


def reference(m, x):
    b, n, d = x.shape
    W = m.conv.weight  # [3 d, d, k]: tap i reads position t - (k - 1) + i
    k = W.shape[2]
    c = torch.zeros(b, d, dtype=x.dtype)
    hs = []
    for t in range(n):
        acc = torch.zeros(b, 3 * d, dtype=x.dtype) + (0 if m.conv.bias is None else m.conv.bias)
        for i in range(k):
            j = t - (k - 1) + i
            if j >= 0:
                acc = acc + x[:, j] @ W[:, :, i].T
        z, f, o = torch.tanh(acc[:, :d]), torch.sigmoid(acc[:, d:2 * d]), torch.sigmoid(acc[:, 2 * d:])
        c = f * c + (1 - f) * z
        hs.append(o * c)
    return torch.stack(hs, 1)


def perturbed(**args):
    m, _, _ = make_op("rnn", "qrnn", d=D, causal=True, **args)
    perturb_params(m, scale=0.3)
    return m


ARGS = [{}, {"window": 1, "chunk": 4}, {"window": 3, "chunk": 1, "bias": False}, {"window": 5, "chunk": 7}]


@pytest.mark.parametrize("args", ARGS, ids=["default", "k1-T4", "k3-T1", "k5-T7"])
@pytest.mark.parametrize("n", [1, 6, 37])
def test_qrnn_matches_fo_pooling(args, n):
    m = perturbed(**args)
    x = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want, got = reference(m, x), m(x, Ctx())
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()


@pytest.mark.parametrize("args", ARGS[:2] + ARGS[3:], ids=["default", "k1", "k5"])
def test_decodes_in_pieces_with_a_constant_state(args):
    m = perturbed(**args)
    nbytes = assert_decodes_with_constant_state(m, "rnn", "qrnn", D, args)
    assert nbytes[0] == 2 * D * m.k * 8


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_enters_neither_state_nor_window(side):
    assert_padded_row_alone(perturbed(window=3, chunk=4), side, d=D)


def test_every_parameter_learns():
    assert_every_parameter_learns(perturbed(window=3, chunk=4), d=D)


def test_validation():
    base = "vocab = 50\nd_model = 32\nmodel m(causal={c}) = input(tokens) -> embed(token) -> norm -> rnn(qrnn{a}) -> norm -> head(lm)\n"
    evodsl.parse(base.format(c="true", a=", window=3"))
    with pytest.raises(EvoError, match="causal only"):
        evodsl.parse(base.format(c="false", a=""))
    for bad in ("window=0", "chunk=0", "window=65"):
        with pytest.raises(EvoError, match=bad.split("=")[0]):
            evodsl.parse(base.format(c="true", a=", " + bad))
