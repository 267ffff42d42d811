"""embed(complex) (Wang et al. 2019, arXiv:1912.12333): f(j, p)_k = r_jk e^{i(ω_jk p + θ_jk)}, carried as [Re | Im],
against a float64 reference written from the equation with Python's complex numbers; the paper's two properties
(a shift is a word-dependent rotation, the amplitude bounds it); decoding at an offset; the refusals."""
from __future__ import annotations

import cmath

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import make_op, perturb_params

V = 11


def reference(m, ids, start=0):
    """[b, n, d] from the equation, one complex number at a time."""
    r, w, th = (t.detach().tolist() for t in (m.amplitude, m.frequency, m.phase))
    b, n = ids.shape
    half = len(r[0])
    out = torch.zeros(b, n, 2 * half, dtype=torch.float64)
    for i in range(b):
        for p in range(n):
            j = int(ids[i, p])
            for k in range(half):
                z = r[j][k] * cmath.exp(1j * (w[j][k] * (start + p) + th[j][k]))
                out[i, p, k], out[i, p, half + k] = z.real, z.imag
    return out


def build(d=8, seed=1):
    m, _, _ = make_op("embed", "complex", in_shapes=(("b", "n"),), vocab=V, d_model=d)
    perturb_params(m, seed=seed)
    return m


@pytest.mark.parametrize("d,n,start", [(8, 13, 0), (6, 5, 0), (2, 1, 0), (8, 7, 19)])
def test_equation(d, n, start):
    m = build(d)
    ids = torch.randint(0, V, (2, n), generator=torch.Generator().manual_seed(d + n))
    got = m(ids, Ctx(offset=start))
    torch.testing.assert_close(got, reference(m, ids, start), rtol=1e-12, atol=1e-12)


def test_initial_frequencies_are_the_sinusoidal_ones():
    m, _, _ = make_op("embed", "complex", in_shapes=(("b", "n"),), vocab=V, d_model=8)
    want = 10000.0 ** (-torch.arange(4, dtype=torch.float64) * 2 / 8)
    torch.testing.assert_close(m.frequency, want.expand(V, 4))
    assert not m.phase.any() and m.amplitude.std() < 0.1


def test_a_shift_is_a_rotation_and_the_amplitude_bounds():
    """f(j, p + t) = e^{i ω_j t} f(j, p) (the paper's offset transformation) and |f(j, p)_k| = |r_jk|."""
    m = build(8, seed=3)
    ids = torch.tensor([[3, 7, 3, 0, 10]])
    t = 6
    f, g = (m(ids, Ctx(offset=o)) for o in (0, t))
    z0, zt = torch.complex(f[..., :4], f[..., 4:]), torch.complex(g[..., :4], g[..., 4:])
    turn = torch.polar(torch.ones_like(m.frequency[ids]), m.frequency[ids] * t).detach()
    torch.testing.assert_close(zt, turn * z0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z0.abs(), m.amplitude[ids].abs().detach(), rtol=1e-12, atol=1e-12)


def test_every_parameter_learns():
    m = build(8)
    m(torch.tensor([[1, 2, 3, 4]]), Ctx(offset=2)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


SPEC = """
vocab = 23
d_model = 16
model m(causal=true) = input(tokens) -> embed(complex) -> repeat(norm -> mha(softmax, heads=2, kv_heads=1) -> norm -> ffn, 2)
    -> norm -> head(lm, tied=false)
"""


def test_decoding_at_an_offset_equals_the_forward():
    model = evodsl.compile(SPEC, dtype=torch.float64)
    perturb_params(model.get_submodule("embed"), seed=2)  # r, ω, θ off their init
    ids = torch.randint(0, 23, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        state, pieces, at = None, [], 0
        for k in (5, 1, 8, 3):
            logits, state = model.decode(ids[:, at:at + k], state)
            pieces.append(logits)
            at += k
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("src,want", [
    ("vocab = 9\nd_model = 15\nmodel m = input(tokens) -> embed(complex) -> head(lm, tied=false)", "is odd"),
    ("d_model = 8\nmodel m = input(features, d=8) -> embed(complex) -> head(linear, d_out=2)", "needs token ids"),
])
def test_refusals(src, want):
    with pytest.raises(EvoError, match=want):
        evodsl.compile(src)
