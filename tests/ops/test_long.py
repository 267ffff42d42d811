"""longconv(long) against the paper's equations (Fu et al. 2023, Sec. 3.2), in float64, written here with loops from
the module's parameters: the kernel smoothed tap by tap (K_k = (2p + 1)^-1 sum_{|j| <= p} K_{k+j}, zeros past the
ends), squashed (sign(K) max(|K| - lam, 0)), the causal sum y_t = sum_{s <= t} K_s x_{t-s} (bidirectional: plus
sum_{s >= 1} K'_{s-1} x_{t+s}), then D x, GELU and the output GLU. The step form (its growing history) equals the
forward piece by piece."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_no_leak, assert_padded_row_alone, decode_in_pieces, make_op, perturb_params

D = 8


def taps(m, c):
    k, p, L = m.kernel[c], m.width // 2, m.kernel.shape[-1]
    out = torch.zeros_like(k)
    for i in range(L):
        for j in range(-p, p + 1):
            if 0 <= i + j < L:
                out[:, i] += k[:, i + j] / m.width
    return torch.sign(out) * torch.clamp(out.abs() - m.lam, min=0)


def reference(m, u):
    b, n, d = u.shape
    x = u.transpose(1, 2)
    K = [taps(m, c) for c in range(m.kernel.shape[0])]
    y = torch.zeros_like(x)
    for t in range(n):
        for s in range(t + 1):
            y[..., t] += K[0][:, s] * x[..., t - s]
        if not m.causal:
            for s in range(1, n - t):
                y[..., t] += K[1][:, s - 1] * x[..., t + s]
    y = F.gelu(y + m.D[:, None] * x).transpose(1, 2) @ m.out.weight.T + m.out.bias
    return F.glu(y, -1) if m.glu else y


CASES = [(True, {}), (True, {"smooth": 1, "glu": False}), (False, {"smooth": 5}), (False, {"lam": 0.0})]


@pytest.mark.parametrize("causal,args", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("n", [1, 7, 40])
def test_long_matches_the_papers_convolution(causal, args, n):
    m, _, _ = make_op("longconv", "long", d=D, causal=causal, max_len=40, **args)
    perturb_params(m, scale=0.05)  # taps of the init's order, so that the threshold cuts some and not others
    assert 0 < (taps(m, 0) == 0).float().mean() < 1 or m.lam == 0
    x = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want, got = reference(m, x), m(x, Ctx())
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()


@pytest.mark.parametrize("args", [{}, {"smooth": 1, "glu": False}])
def test_causal_does_not_leak_and_decodes_with_its_history(args):
    from costhelpers import declared

    m, _, _ = make_op("longconv", "long", d=D, causal=True, max_len=32, **args)
    perturb_params(m, scale=0.05)
    x = torch.randn(2, 30, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_no_leak(lambda t: m(t, Ctx()), n=20, d=D)
        want = m(x, Ctx())
        for sizes in ((5, 1, 3, 1, 20), (1,) * 30, (30,)):
            y, _ = decode_in_pieces(m, x, sizes)
            assert (y - want).abs().max().item() <= 1e-10 * want.abs().max().item()
        for t in (1, 4, 30):  # the history grows with the length: no finite state
            _, state = decode_in_pieces(m, x[:, :t], (1,) * t)
            _, _, cost, ev = declared("longconv", "long", 2, t, dtype=torch.float64, d=D, causal=True, max_len=32, **args)
            assert state.nbytes() == ev(cost.cache) == 2 * D * t * 8


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_enters_no_convolution(side):
    m, _, _ = make_op("longconv", "long", d=D, causal=True, max_len=16)
    perturb_params(m, scale=0.05)
    assert_padded_row_alone(m, side, d=D)


def test_validation():
    base = "vocab = 50\nd_model = 32\nmodel m(causal=true) = input(tokens) -> embed(token) -> norm -> longconv(long{a}) -> norm -> head(lm)\n"
    evodsl.parse(base.format(a=", max_len=64, smooth=5"))
    with pytest.raises(EvoError, match="centred"):
        evodsl.parse(base.format(a=", max_len=64, smooth=4"))
    for bad in ("max_len=0", "lam=-1.0", "smooth=0"):
        with pytest.raises(EvoError, match=bad.split("=")[0]):
            evodsl.parse(base.format(a=", " + bad if bad.startswith("max_len") else ", max_len=64, " + bad))
    m, _, _ = make_op("longconv", "long", d=D, causal=True, max_len=8)
    with pytest.raises(EvoError, match="max_len=8"):
        m(torch.zeros(1, 9, D, dtype=torch.float64), Ctx())
