"""longconv(flexconv) against its equation (Romero et al. 2021, FlexConv), in float64: CKConv's SIREN kernel
(written out in test_ckconv.reference) times the Gaussian mask exp(-(p - mu)^2 / (2 sigma^2)) at every lag, the
depthwise convolution over an explicit table of lags, the pointwise mix. mu and sigma learn (the kernel's size is
differentiable); decoding equals the forward piece by piece."""
from __future__ import annotations

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_every_parameter_learns, decode_in_pieces, make_op, perturb_params

from .test_ckconv import reference

D = 16
ARGS = [{"max_len": 32}, {"hidden": 8, "layers": 2, "omega_0": 3.0, "max_len": 9, "bias": False, "sigma": 0.1}]


def _op(causal, **args):
    m, p, _ = make_op("longconv", "flexconv", d=D, causal=causal, **args)
    perturb_params(m, scale=0.3)
    with torch.no_grad():
        m.kernel.sigma.copy_(0.2 + m.kernel.sigma.abs())
    return m, p


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("args", ARGS, ids=[str(i) for i in range(len(ARGS))])
@pytest.mark.parametrize("n", [1, 33])
def test_flexconv_matches_the_equation(args, n, causal):
    m, p = _op(causal, **args)
    x = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want = reference(m, x, causal, p.max_len, p.omega_0, (m.kernel.mu, m.kernel.sigma))
        got = m(x, Ctx())
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()


def test_the_mask_starts_on_the_newest_token_and_sets_the_kernel_size():
    """At init mu is the newest token (causal, p = +1) or lag 0; a narrow sigma leaves the far lags out."""
    for causal, mu in ((True, 1.0), (False, 0.0)):
        m, _, _ = make_op("longconv", "flexconv", d=D, causal=causal, max_len=20, sigma=0.05)
        assert m.kernel.mu.item() == mu and abs(m.kernel.sigma.item() - 0.05) < 1e-8
        with torch.no_grad():
            k = m.taps(20, torch.zeros(1, dtype=torch.float64))  # lags 0..19 (and the negative ones above 20)
        assert k[8:20].abs().max() < 1e-12 * k[0].abs().max()


def test_decodes_piece_by_piece():  # (the leak check: SEQ_BUILD in tests/ops/test_leaks.py)
    m, _ = _op(True, max_len=16)
    x = torch.randn(2, 30, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = m(x, Ctx())
        for sizes in ((5, 1, 3, 1, 20),):
            y, state = decode_in_pieces(m, x, sizes)
            assert (y - want).abs().max().item() <= 1e-10 * want.abs().max().item()
            assert state.nbytes() == 2 * 30 * D * 8


def test_every_parameter_learns_mu_and_sigma_too():
    m, _, _ = make_op("longconv", "flexconv", d=D, causal=False, max_len=40)
    assert_every_parameter_learns(m, d=D)


def test_validation():
    base = "d_model = 32\nmodel m(causal=true) = input(features, d=32) -> residual(longconv(flexconv{a})) -> head(linear, d_out=2)\n"
    evodsl.parse(base.format(a=", sigma=0.2"))
    for bad in ("sigma=0.0", "hidden=0", "layers=1", "max_len=1"):
        with pytest.raises(EvoError, match=bad.split("=")[0]):
            evodsl.parse(base.format(a=", " + bad))
