"""longconv(flexconv) against its equation (Romero et al. 2021, FlexConv), in float64: the kernel network (MAGNet,
the paper's, written out below from Section 3's formulas; or CKConv's SIREN, written out in test_ckconv.reference)
times the Gaussian mask exp(-(p - mu)^2 / (2 sigma^2)) at every lag, the depthwise convolution over an explicit
table of lags (a direct O(n^2) sum), the pointwise mix. mu and sigma learn (the kernel's size is differentiable);
decoding equals the forward piece by piece, its state the declared kv_cache."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_every_parameter_learns, decode_in_pieces, make_op, perturb_params

from .test_ckconv import reference

D = 16
ARGS = [{"max_len": 32}, {"hidden": 8, "layers": 2, "omega_0": 3.0, "max_len": 9, "bias": False, "sigma": 0.1}]
MAGNET_ARGS = [{"max_len": 32}, {"hidden": 8, "layers": 2, "input_scale": 3.0, "max_len": 9, "bias": False,
                                 "sigma": 0.1}, {"hidden": 5, "layers": 4, "max_len": 20, "sigma": 1.5}]


def _op(causal, **args):
    m, p, _ = make_op("longconv", "flexconv", d=D, causal=causal, **args)
    perturb_params(m, scale=0.3)
    with torch.no_grad():
        m.kernel.sigma.copy_(0.2 + m.kernel.sigma.abs())
    return m, p


def magnet(net, p):
    """MAGNet written out from the paper, unit by unit: g_l(p) = exp(-gamma_l^2 (p - mu_l)^2 / 2) sin(w_l p + c_l),
    h_1 = g_1, h_(l+1) = (W_l h_l + b_l) g_(l+1), k = W_L h_L + b_L; then FlexConv's mask. p [T] -> [T, d]."""
    L, H = net.gamma.shape
    g = [[torch.exp(-net.gamma[l, j] ** 2 * (p - net.mu_g[l, j]) ** 2 / 2)
          * torch.sin(net.freq[l, j] * p + net.phase[l, j]) for j in range(H)] for l in range(L)]  # g[l][j]: [T]
    h = g[0]
    for l in range(1, L):
        W, b = net.linears[l - 1].weight, net.linears[l - 1].bias
        h = [(sum(W[i, j] * h[j] for j in range(H)) + b[i]) * g[l][i] for i in range(H)]
    W, b = net.out.weight, net.out.bias
    k = torch.stack([sum(W[c, j] * h[j] for j in range(H)) + b[c] for c in range(W.shape[0])], -1)
    return k * torch.exp(-(p - net.mu) ** 2 / (2 * net.sigma ** 2))[:, None]


def direct(m, x, causal, max_len):
    """y_t = W_o sum_s k(t - s) x_s + b_o, a loop over output tokens, k from magnet() at every lag -(n-1) .. n-1
    (the future ones left out when causal)."""
    n = x.shape[1]
    lag = torch.arange(-(n - 1), n, dtype=x.dtype)
    k = magnet(m.kernel, 1 - 2 * lag / (max_len - 1) if causal else lag / (max_len - 1))  # k[n - 1 + j]: lag j
    ys = []
    for t in range(n):
        stop = t + 1 if causal else n
        ys.append(sum(k[n - 1 + t - s] * x[:, s] for s in range(stop)))
    y = torch.stack(ys, 1)
    return y @ m.mix.weight.T + (0 if m.mix.bias is None else m.mix.bias)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("args", ARGS, ids=[str(i) for i in range(len(ARGS))])
@pytest.mark.parametrize("n", [1, 33])
def test_flexconv_siren_matches_the_equation(args, n, causal):
    m, p = _op(causal, kernel="siren", **args)
    x = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want = reference(m, x, causal, p.max_len, p.omega_0, (m.kernel.mu, m.kernel.sigma))
        got = m(x, Ctx())
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("args", MAGNET_ARGS, ids=[str(i) for i in range(len(MAGNET_ARGS))])
def test_the_magnet_kernel_matches_the_paper(args, causal):
    """The kernel network alone at lags inside and past max_len (extrapolated), negative lags too (bidirectional)."""
    m, p = _op(causal, **args)
    lag = torch.arange(-3 * p.max_len, 3 * p.max_len, dtype=torch.float64)
    pos = 1 - 2 * lag / (p.max_len - 1) if causal else lag / (p.max_len - 1)
    with torch.no_grad():
        got = m.kernel(lag, torch.ones_like(lag, dtype=torch.bool))
        want = magnet(m.kernel, pos)
    assert want.abs().max() > 1e-3 and (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("args", MAGNET_ARGS, ids=[str(i) for i in range(len(MAGNET_ARGS))])
@pytest.mark.parametrize("n", [1, 17, 41])
def test_flexconv_magnet_matches_a_direct_convolution(args, n, causal):
    m, p = _op(causal, **args)
    x = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want = direct(m, x, causal, p.max_len)
        got = m(x, Ctx())
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_the_magnet_init(causal):
    """gamma_l ~ Gamma(6 / l, 1): later layers' windows wider (smaller gamma) on average; w_l within input_scale /
    sqrt(L) gamma_l; c_l within pi; the windows' centres within 1.667 sigma of the mask's centre."""
    torch.manual_seed(0)
    L, H, sigma, scale = 3, 256, 0.2, 25.6
    m, _, _ = make_op("longconv", "flexconv", d=D, causal=causal, hidden=H, layers=L, sigma=sigma)
    net, centre = m.kernel, (1.0 if causal else 0.0)
    means = net.gamma.mean(1)
    assert (net.gamma > 0).all() and means[0] > means[1] > means[2]
    assert all(abs(means[l].item() - 6.0 / (l + 1)) < 0.25 * 6.0 / (l + 1) for l in range(L))
    assert (net.freq.abs() <= scale / math.sqrt(L) * net.gamma + 1e-12).all()
    assert net.phase.abs().max() <= math.pi and net.phase.abs().max() > 0.9 * math.pi
    assert ((net.mu_g - centre).abs() <= 1.667 * sigma + 1e-12).all() and net.mu.item() == centre


@pytest.mark.parametrize("kernel", ["magnet", "siren"])
def test_the_mask_starts_on_the_newest_token_and_sets_the_kernel_size(kernel):
    """At init mu is the newest token (causal, p = +1) or lag 0; a narrow sigma leaves the far lags out."""
    for causal, mu in ((True, 1.0), (False, 0.0)):
        m, _, _ = make_op("longconv", "flexconv", d=D, causal=causal, max_len=20, sigma=0.05, kernel=kernel)
        assert m.kernel.mu.item() == mu and abs(m.kernel.sigma.item() - 0.05) < 1e-8
        with torch.no_grad():
            k = m.taps(20, torch.zeros(1, dtype=torch.float64))  # lags 0..19 (and the negative ones above 20)
        assert k[8:20].abs().max() < 1e-12 * k[0].abs().max()


@pytest.mark.parametrize("kernel", ["magnet", "siren"])
def test_decodes_piece_by_piece(kernel):  # (the leak check: SEQ_BUILD in tests/ops/test_leaks.py)
    from costhelpers import declared

    m, p = _op(True, max_len=16, kernel=kernel)
    x = torch.randn(2, 30, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _, _, cost, ev = declared("longconv", "flexconv", 2, 30, dtype=torch.float64, d=D, causal=True, max_len=16,
                              kernel=kernel)
    with torch.no_grad():
        want = m(x, Ctx())
        for sizes in ((5, 1, 3, 1, 20), (1,) * 30):
            y, state = decode_in_pieces(m, x, sizes)
            assert (y - want).abs().max().item() <= 1e-10 * want.abs().max().item()
            assert state.nbytes() == ev(cost.cache) == 2 * 30 * D * 8  # every input so far: it grows with the length


@pytest.mark.parametrize("kernel", ["magnet", "siren"])
def test_every_parameter_learns_mu_and_sigma_too(kernel):
    m, _, _ = make_op("longconv", "flexconv", d=D, causal=False, max_len=40, kernel=kernel)
    assert_every_parameter_learns(m, d=D)


def test_validation():
    base = "d_model = 32\nmodel m(causal=true) = input(features, d=32) -> residual(longconv(flexconv{a})) -> head(linear, d_out=2)\n"
    evodsl.parse(base.format(a=", sigma=0.2"))
    assert next(evodsl.compile(base.format(a=""), device="meta").parameters()).is_meta  # MAGNet's Gamma init too
    evodsl.parse(base.format(a=", kernel=siren, omega_0=10.0"))
    evodsl.parse(base.format(a=", kernel=magnet, input_scale=10.0"))
    for bad in ("sigma=0.0", "hidden=0", "layers=1", "max_len=1", "kernel=gabor", "input_scale=0.0"):
        with pytest.raises(EvoError, match=bad.split("=")[0]):
            evodsl.parse(base.format(a=", " + bad))
    for bad, field, owner in (("omega_0=10.0", "omega_0", "siren"), ("kernel=siren, input_scale=2.0", "input_scale",
                                                                       "magnet")):
        with pytest.raises(EvoError) as err:  # a knob of the other network: refused, not ignored
            evodsl.parse(base.format(a=", " + bad))
        text = str(err.value)
        assert f"error[E250]: {field} is an option of kernel={owner}" in text
        assert f"help: drop {field}, or write kernel={owner}" in text
