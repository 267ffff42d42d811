"""longconv(ckconv) against its equation (Romero et al. 2021), in float64, written here from the module's weights:
the SIREN kernel k(p) = W_3 sin(w0 (W_2 sin(w0 (W_1 p + b_1)) + b_2)) + b_3 at every lag (causal p = 1 - 2 lag /
(max_len - 1), bidirectional p = lag / (max_len - 1)), the depthwise convolution as a sum over an explicit [n, n]
table of lags, then the pointwise mix. The FFT form equals it at lengths below, at and past max_len; decoding equals
the forward piece by piece, its state the declared kv_cache (every input so far)."""
from __future__ import annotations

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_every_parameter_learns, decode_in_pieces, make_op, perturb_params, spec_onnx_parity

D = 16


def siren(lins, omega_0, p):
    """The kernel network written out: p [T] -> [T, d]."""
    h = p[:, None]
    for lin in lins[:-1]:
        h = torch.sin(omega_0 * (h @ lin.weight.T + lin.bias))
    return h @ lins[-1].weight.T + lins[-1].bias


def reference(m, x, causal, max_len, omega_0, gauss=None):
    """y_t = W_o sum_s k(t - s) x_s + b_o over the lag table; gauss = (mu, sigma): FlexConv's mask on k."""
    n = x.shape[1]
    lag = torch.arange(n, dtype=x.dtype)[:, None] - torch.arange(n, dtype=x.dtype)[None, :]  # t - s
    p = 1 - 2 * lag / (max_len - 1) if causal else lag / (max_len - 1)
    k = siren(m.kernel.linears, omega_0, p.reshape(-1)).reshape(n, n, -1)  # [t, s, d]
    if gauss is not None:
        k = k * torch.exp(-0.5 * ((p - gauss[0]) / gauss[1]) ** 2)[..., None]
    if causal:
        k = k * (lag >= 0)[..., None]
    y = torch.einsum("tsc,bsc->btc", k, x)
    return y @ m.mix.weight.T + (0 if m.mix.bias is None else m.mix.bias)


ARGS = [{"max_len": 32}, {"hidden": 8, "layers": 2, "omega_0": 3.0, "max_len": 9, "bias": False},
        {"hidden": 5, "layers": 4, "omega_0": 1.0, "max_len": 100}]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("args", ARGS, ids=[str(i) for i in range(len(ARGS))])
@pytest.mark.parametrize("n", [1, 33])
def test_ckconv_matches_the_equation(args, n, causal):
    m, p, _ = make_op("longconv", "ckconv", d=D, causal=causal, **args)
    perturb_params(m, scale=0.3)
    x = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want = reference(m, x, causal, p.max_len, p.omega_0)
        got = m(x, Ctx())
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()


def test_the_default_init_is_sirens_and_the_output_keeps_its_scale():
    m, _, _ = make_op("longconv", "ckconv", d=64, causal=False, dtype=torch.float32, max_len=256)
    w1, w2 = m.kernel.linears[0].weight, m.kernel.linears[1].weight
    assert w1.abs().max() <= 1 and w2.abs().max() <= (6 / 32) ** 0.5 / 30 + 1e-7
    x = torch.randn(4, 256, 64)
    with torch.no_grad():
        y = m.mix(torch.fft.irfft(torch.fft.rfft(x, 512, dim=1), 512, dim=1)[:, :256])  # the mix alone
        conv = m(x, Ctx())
    assert 0.1 < conv.std().item() / y.std().item() < 10


def test_decodes_piece_by_piece():
    """The step form equals the forward piece by piece (past max_len too); its state is every input so far, the
    declared kv_cache. (The leak check is the harness's: SEQ_BUILD in tests/ops/test_leaks.py.)"""
    from costhelpers import declared

    args = ARGS[1]
    m, _, _ = make_op("longconv", "ckconv", d=D, causal=True, **args)
    perturb_params(m, scale=0.3)
    x = torch.randn(2, 30, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = m(x, Ctx())
        states = {}
        for sizes in ((5, 1, 3, 1, 20), (1,) * 30):
            y, states[30] = decode_in_pieces(m, x, sizes)
            assert (y - want).abs().max().item() <= 1e-10 * want.abs().max().item()
        _, states[4] = decode_in_pieces(m, x[:, :4], (1,) * 4)
        for t, state in states.items():
            _, _, cost, ev = declared("longconv", "ckconv", 2, t, dtype=torch.float64, d=D, causal=True, **args)
            assert state.nbytes() == ev(cost.cache) == 2 * t * D * 8


def test_every_parameter_learns():
    m, _, _ = make_op("longconv", "ckconv", d=D, causal=True, max_len=40)
    assert_every_parameter_learns(m, d=D)


def test_validation():
    base = "d_model = 32\nmodel m(causal={c}) = input(features, d=32) -> residual(longconv(ckconv{a})) -> head(linear, d_out=2)\n"
    evodsl.parse(base.format(c="true", a=", hidden=8"))
    evodsl.parse(base.format(c="false", a=", max_len=64"))
    for bad in ("hidden=0", "layers=1", "omega_0=0.0", "max_len=1", "bias=3"):
        with pytest.raises(EvoError, match=bad.split("=")[0]):
            evodsl.parse(base.format(c="true", a=", " + bad))


@pytest.mark.slow  # ~30 s: an export (test_onnx.py exports each long convolution causal in the default run)
def test_the_bidirectional_long_convolutions_export(tmp_path):
    """ckconv, flexconv (MAGNet and SIREN), ccnn and talk bidirectional in one model: one ONNX file (a symbolic n; the FFT over 2 n,
    TaLK's gathers), onnxruntime against torch at n = 7, 33, 70, batches of 1 and 3, a right-padded row."""
    src = ("d_model = 32\nmodel m(causal=false) = input(features, d=32) -> norm -> residual(longconv(ckconv, max_len=128)) "
           "-> norm -> residual(longconv(flexconv, max_len=128)) -> residual(longconv(flexconv, kernel=siren, max_len=128)) "
           "-> longconv(ccnn, max_len=128) "
           "-> norm -> residual(longconv(talk, l_max=6, r_max=3, heads=4)) -> head(linear, d_out=8)\n")
    assert spec_onnx_parity(src, tmp_path) <= 1e-4
