"""longconv(hyena) against the paper's recurrence (Poli et al. 2023, Def. 3.1 and Sec. 3.3), in float64, written here
with loops from the module's weights: in_proj, the short causal depthwise convolution tap by tap, the implicit
filter (the features of t, the FFN with sin(w .), the decay window), then z = v and z <- x_i (h_i * z + beta_i z)
as direct sums, out_proj. The step form (the short convolution's window and the histories) equals the forward piece
by piece; its declared state grows with the length."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_no_leak, assert_padded_row_alone, decode_in_pieces, make_op, perturb_params

D = 8


def filters(m, n):
    f, L = m.filter, m.max_len
    B = f.bands
    freqs = [1e-4 + j * (B - 1 - 1e-4) / max(B - 1, 1) for j in range(B)] if B > 1 else [1e-4]
    rows = []
    for t in range(n):
        z = [t / (L - 1)] + [math.cos(2 * math.pi * fr * t / L) for fr in freqs] + [-math.sin(2 * math.pi * fr * t / L) for fr in freqs]
        h = torch.tensor(z, dtype=torch.float64)
        for layer in f.layers[:-1]:
            h = torch.sin(f.freq * (layer.weight @ h + layer.bias))
        rows.append((f.layers[-1].weight @ h) * torch.exp(-t / (L - 1) * f.delta))
    return torch.stack(rows, -1).reshape(m.N, m.d, n)  # [N, d, n]


def reference(m, u):
    b, n, d = u.shape
    z = (u @ m.in_proj.weight.T + m.in_proj.bias).transpose(1, 2)  # [b, C, n]
    w, s = m.short_conv.weight[:, 0], m.s
    zc = torch.zeros_like(z) + m.short_conv.bias[:, None]
    for t in range(n):
        for i in range(s):
            if t - (s - 1) + i >= 0:
                zc[..., t] += w[:, i] * z[..., t - (s - 1) + i]
    *xs, y = zc.split(d, 1)
    h = filters(m, n)
    for i, x in enumerate(xs):
        conv = torch.zeros_like(y)
        for t in range(n):
            for k in range(t + 1):
                conv[..., t] += h[i, :, k] * y[..., t - k]
        y = x * (conv + m.beta[i, :, None] * y)
    return y.transpose(1, 2) @ m.out_proj.weight.T + m.out_proj.bias


ARGS = [{"filter_order": 8}, {"order": 1, "filter_order": 4, "emb": 5}, {"order": 3, "short": 1, "filter_order": 4, "emb": 7}]


@pytest.mark.parametrize("args", ARGS, ids=[str(i) for i in range(len(ARGS))])
@pytest.mark.parametrize("n", [1, 6, 29])
def test_hyena_matches_the_recurrence(args, n):
    m, _, _ = make_op("longconv", "hyena", d=D, causal=True, max_len=32, **args)
    perturb_params(m)
    x = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want, got = reference(m, x), m(x, Ctx())
    # 1e-9: the FFT's rounding scales with the gated intermediates (order 3: ~1e2 times the output), not the output
    assert (got - want).abs().max().item() <= 1e-9 * want.abs().max().item()


def test_the_window_decays_each_channel():
    m, _, _ = make_op("longconv", "hyena", d=D, causal=True, max_len=100, filter_order=8)
    delta = m.filter.delta
    assert delta.shape == (2 * D,) and math.isclose(delta[0].item(), -math.log(1e-2) / 1.5, rel_tol=1e-6)
    assert math.isclose(delta[-1].item(), -math.log(1e-2) / 0.3, rel_tol=1e-6)


@pytest.mark.parametrize("args", ARGS[:2])
def test_causal_does_not_leak_and_decodes_with_its_histories(args):
    from costhelpers import declared

    m, _, _ = make_op("longconv", "hyena", d=D, causal=True, max_len=32, **args)
    perturb_params(m)
    x = torch.randn(2, 30, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_no_leak(lambda t: m(t, Ctx()), n=20, d=D)
        want = m(x, Ctx())
        for sizes in ((5, 1, 3, 1, 20), (1,) * 30, (30,)):
            y, _ = decode_in_pieces(m, x, sizes)
            assert (y - want).abs().max().item() <= 1e-10 * want.abs().max().item()
        for t in (1, 30):  # the histories grow with the length: no finite state
            _, state = decode_in_pieces(m, x[:, :t], (1,) * t)
            _, _, cost, ev = declared("longconv", "hyena", 2, t, dtype=torch.float64, d=D, causal=True, max_len=32, **args)
            assert state.nbytes() == ev(cost.cache) == 2 * D * (m.N + 1) * (m.s - 1) * 8 + m.N * 2 * D * t * 8


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_enters_no_convolution(side):
    m, _, _ = make_op("longconv", "hyena", d=D, causal=True, max_len=16, filter_order=4)
    perturb_params(m)
    assert_padded_row_alone(m, side, d=D)


def test_validation():
    base = "vocab = 50\nd_model = 32\nmodel m(causal={c}) = input(tokens) -> embed(token) -> norm -> longconv(hyena{a}) -> norm -> head(lm)\n"
    evodsl.parse(base.format(c="true", a=", max_len=64, order=3, emb=5"))
    with pytest.raises(EvoError, match="causal only"):
        evodsl.parse(base.format(c="false", a=", max_len=64"))
    with pytest.raises(EvoError, match="odd emb"):
        evodsl.parse(base.format(c="true", a=", max_len=64, emb=4"))
    for bad in ("order=0", "filter_order=0", "short=0", "max_len=1"):
        with pytest.raises(EvoError, match=bad.split("=")[0]):
            evodsl.parse(base.format(c="true", a=", max_len=64, " + bad if not bad.startswith("max") else ", " + bad))
    m, _, _ = make_op("longconv", "hyena", d=D, causal=True, max_len=8, filter_order=4)
    with pytest.raises(EvoError, match="max_len=8"):
        m(torch.zeros(1, 9, D, dtype=torch.float64), Ctx())
