"""longconv(sgconv) against the paper's kernel (Li et al. 2022, Sec. 3.2), in float64, written here with loops from
the module's sub-kernels: sub-kernel i upsampled by 2^max(i - 1, 0) (linear interpolation, half-pixel centres,
clamped at the ends), weighted alpha^i, concatenated, divided by the init's norm, read at lags 0..n-1 (zeros past
its taps); the causal sum y_t = sum_{s <= t} K_s x_{t-s} (bidirectional: plus sum_{s >= 1} K'_{s-1} x_{t+s}), then
D x, GELU and the output GLU. The step form equals the forward piece by piece."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import evodsl
from evodsl.ops import Ctx
from ophelpers import assert_no_leak, assert_padded_row_alone, decode_in_pieces, make_op, perturb_params

D = 8


def upsample(w, f):
    k = w.shape[-1]
    out = torch.zeros(*w.shape[:-1], k * f, dtype=w.dtype)
    for o in range(k * f):
        x = max((o + 0.5) / f - 0.5, 0.0)
        i0 = math.floor(x)
        i1, lam = min(i0 + 1, k - 1), x - i0
        out[..., o] = (1 - lam) * w[..., i0] + lam * w[..., i1]
    return out


def kernel(m):
    parts = [upsample(w, 2 ** max(i - 1, 0)) * m.alpha ** i for i, w in enumerate(m.w)]
    return torch.cat(parts, -1) / m.norm


def reference(m, u):
    b, n, d = u.shape
    x = u.transpose(1, 2)
    K = kernel(m)
    K = F.pad(K, (0, max(0, n - K.shape[-1])))
    y = torch.zeros_like(x)
    for t in range(n):
        for s in range(t + 1):
            y[..., t] += K[0, :, s] * x[..., t - s]
        if not m.causal:
            for s in range(1, n - t):
                y[..., t] += K[1, :, s - 1] * x[..., t + s]
    y = F.gelu(y + m.D[:, None] * x).transpose(1, 2) @ m.out.weight.T + m.out.bias
    return F.glu(y, -1) if m.glu else y


CASES = [(True, {"max_len": 24, "kernel_dim": 3}), (True, {"max_len": 5, "kernel_dim": 5, "glu": False}),
         (False, {"max_len": 40, "kernel_dim": 4, "alpha": 0.8}), (False, {"max_len": 9, "kernel_dim": 2})]


@pytest.mark.parametrize("causal,args", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("n", [1, 7, 37])
def test_sgconv_matches_the_papers_kernel(causal, args, n):
    m, _, _ = make_op("longconv", "sgconv", d=D, causal=causal, **args)
    perturb_params(m)
    assert len(m.w) == 1 + max(0, math.ceil(math.log2(args["max_len"] / args["kernel_dim"])))
    x = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want, got = reference(m, x), m(x, Ctx())
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()


def test_the_kernel_has_unit_norm_at_init_and_params_grow_with_log_length():
    m, _, _ = make_op("longconv", "sgconv", d=D, causal=True, max_len=64, kernel_dim=4)
    with torch.no_grad():
        assert torch.allclose(kernel(m).norm(dim=-1), torch.ones(1, D, dtype=torch.float64))
    sizes = [sum(w.numel() for w in make_op("longconv", "sgconv", d=D, causal=True, max_len=L, kernel_dim=4)[0].w)
             for L in (64, 128, 256)]
    assert sizes == [5 * 4 * D, 6 * 4 * D, 7 * 4 * D]


def test_causal_does_not_leak_and_decodes_with_its_history():
    from costhelpers import declared

    args = {"max_len": 24, "kernel_dim": 3}
    m, _, _ = make_op("longconv", "sgconv", d=D, causal=True, **args)
    perturb_params(m)
    x = torch.randn(2, 30, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_no_leak(lambda t: m(t, Ctx()), n=20, d=D)
        want = m(x, Ctx())
        for sizes in ((5, 1, 3, 1, 20), (1,) * 30, (30,)):
            y, _ = decode_in_pieces(m, x, sizes)
            assert (y - want).abs().max().item() <= 1e-10 * want.abs().max().item()
        for t in (1, 30):
            _, state = decode_in_pieces(m, x[:, :t], (1,) * t)
            _, _, cost, ev = declared("longconv", "sgconv", 2, t, dtype=torch.float64, d=D, causal=True, **args)
            assert state.nbytes() == ev(cost.cache) == 2 * D * t * 8


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_enters_no_convolution(side):
    m, _, _ = make_op("longconv", "sgconv", d=D, causal=True, max_len=8, kernel_dim=2)
    perturb_params(m)
    assert_padded_row_alone(m, side, d=D)


def test_validation():
    base = "vocab = 50\nd_model = 32\nmodel m(causal=true) = input(tokens) -> embed(token) -> norm -> longconv(sgconv{a}) -> norm -> head(lm)\n"
    evodsl.parse(base.format(a=", max_len=64, kernel_dim=8, alpha=0.25"))
    for bad in ("kernel_dim=0", "alpha=0.0", "alpha=1.5"):
        with pytest.raises(evodsl.EvoError, match=bad.split("=")[0]):
            evodsl.parse(base.format(a=", max_len=64, " + bad))
    with pytest.raises(evodsl.EvoError, match="max_len"):
        evodsl.parse(base.format(a=""))
