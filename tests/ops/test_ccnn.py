"""longconv(ccnn) against the CCNN block's equation (Knigge, Romero et al. 2022), in float64: LayerNorm written from
its weights, FlexConv's masked SIREN kernel over an explicit table of lags with the pointwise mix (test_ckconv's
reference), GELU, the pointwise linear, GELU, the residual. Causal and bidirectional; decoding equals the forward
piece by piece; a model of CCNN blocks (the spec fragment in the op's docstring) runs."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_every_parameter_learns, decode_in_pieces, make_op, perturb_params

from .test_ckconv import reference as conv_reference

D = 16


def gelu(v):
    return 0.5 * v * (1 + torch.erf(v / math.sqrt(2)))


def reference(m, x, causal, p):
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    u = (x - mu) / torch.sqrt(var + p.eps) * m.norm.weight + m.norm.bias
    v = gelu(conv_reference(m.conv, u, causal, p.max_len, p.omega_0, (m.conv.kernel.mu, m.conv.kernel.sigma)))
    return x + gelu(v @ m.out.weight.T + m.out.bias)


def _op(causal, **args):
    m, p, _ = make_op("longconv", "ccnn", d=D, causal=causal, **args)
    perturb_params(m, scale=0.3)
    with torch.no_grad():
        m.conv.kernel.sigma.copy_(0.2 + m.conv.kernel.sigma.abs())
    return m, p


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("args", [{"max_len": 32}, {"hidden": 8, "layers": 2, "omega_0": 3.0, "max_len": 9, "eps": 0.1}],
                         ids=["default", "small"])
@pytest.mark.parametrize("n", [1, 33])
def test_ccnn_matches_the_block(args, n, causal):
    m, p = _op(causal, **args)
    x = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want, got = reference(m, x, causal, p), m(x, Ctx())
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()


def test_decodes_piece_by_piece():  # (the leak check: SEQ_BUILD in tests/ops/test_leaks.py)
    m, _ = _op(True, max_len=16)
    x = torch.randn(2, 30, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = m(x, Ctx())
        y, state = decode_in_pieces(m, x, (5, 1, 3, 1, 20))
        assert (y - want).abs().max().item() <= 1e-10 * want.abs().max().item()
        assert state.nbytes() == 2 * 30 * D * 8


def test_every_parameter_learns():
    m, _, _ = make_op("longconv", "ccnn", d=D, causal=False, max_len=40, dropout=0.1)
    assert_every_parameter_learns(m, d=D)


def test_a_model_of_ccnn_blocks_runs():
    src = ("model m(causal=true) = input(features, d=8) -> embed(linear, d_model=32) -> longconv(ccnn, max_len=64) "
           "-> longconv(ccnn, max_len=64, hidden=16) -> norm -> head(linear, d_out=10)\n")
    model = evodsl.compile(src)
    with torch.no_grad():
        y = model(torch.randn(2, 40, 8))
    assert y.shape == (2, 40, 10) and torch.isfinite(y).all()


def test_validation():
    base = "d_model = 32\nmodel m(causal=true) = input(features, d=32) -> longconv(ccnn{a}) -> head(linear, d_out=2)\n"
    evodsl.parse(base.format(a=", dropout=0.1"))
    for bad in ("dropout=1.0", "eps=0.0", "sigma=0.0", "hidden=0"):
        with pytest.raises(EvoError, match=bad.split("=")[0]):
            evodsl.parse(base.format(a=", " + bad))
