"""mha(fmm) against its defining equation, in float64: per query t, w_0 * (softmax attention over the band) plus
sum_l w_l * (linear attention with phi_l), written here with explicit loops over queries; with the band over the
whole sequence and no far field it is exact softmax attention; the causal leak check (test_leaks.py) and decode
== forward (test_decode.py)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from evodsl.ops import Ctx
from ophelpers import head_projections, make_op, output_projection, perturb_params

D = 32
PHI = [lambda x: F.elu(x) + 1, lambda x: F.elu(-x) + 1, lambda x: torch.tanh(x) + 1]  # the paper's code's maps


def reference_fmm(m, x, causal, key_mask=None):
    b, n, _ = x.shape
    h, g, dh, w = m.heads, m.kv_heads, m.head_dim, m.window
    q, k, v = head_projections(m, x)  # [b, n, heads, dh]
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        for t in range(n):
            band = [j for j in range(n) if (t - w < j <= t if causal else abs(t - j) < w)]
            seen = [j for j in range(n) if (j <= t or not causal)]
            if key_mask is not None:
                band = [j for j in band if key_mask[bb, j]] or [t]  # a query with no key reads its own
                seen = [j for j in seen if key_mask[bb, j]]
            for hh in range(h):
                kh = hh // (h // g)
                s = k[bb, band, kh] @ q[bb, t, hh] / math.sqrt(dh)
                a = torch.exp(s - s.max())
                o = m.near[hh, 0] * ((a / a.sum()) @ v[bb, band, kh])
                for l, phi in enumerate(PHI[:len(m.maps)]):
                    wts = phi(k[bb, seen, kh]) @ phi(q[bb, t, hh])  # phi(q_t)^T phi(k_j)
                    o = o + m.far[l, hh, 0] * ((wts @ v[bb, seen, kh]) / (wts.sum() + m.eps))
                out[bb, t, hh] = o
    return output_projection(m, out.reshape(b, n, h * dh))


CASES = [(40, 6, 2, None, 1e-6), (37, 5, 3, 2, 1e-6), (29, 40, 1, 1, 0.5), (70, 3, 2, None, 1e-6),
         (19, 1, 3, 2, 1e-6)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("n,w,kernels,kv_heads,eps", CASES)
def test_fmm_matches_equation(causal, n, w, kernels, kv_heads, eps):
    m, _, _ = make_op("mha", "fmm", d=D, heads=4, causal=causal, kv_heads=kv_heads, w=w, kernels=kernels, eps=eps)
    m.chunk = 8  # several chunks of the causal far field
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    ref = reference_fmm(m, x, causal)
    torch.testing.assert_close(m(x, Ctx()), ref, rtol=1e-10, atol=1e-10)  # recording: the autograd forms
    with torch.no_grad():  # causal: the band's prefix and blocks, the far field chunk by chunk
        y = m(x, Ctx())
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
        for weight in (m.near, m.far):  # each part is read
            weight[0, 0, 0] += 1.0
            assert (m(x, Ctx()) - y).abs().max().item() > 1e-6
            weight[0, 0, 0] -= 1.0


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_left_padding_against_the_equation(causal):
    m, _, _ = make_op("mha", "fmm", d=D, heads=4, causal=causal, kv_heads=2, w=4, kernels=3)
    m.chunk = 8
    perturb_params(m)
    x = torch.randn(2, 21, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mask = (torch.arange(21)[None, :] < torch.tensor([21, 12])[:, None]).flip(1)
    with torch.no_grad():
        y, ref = m(x, Ctx(mask=mask)), reference_fmm(m, x, causal, mask)
    assert (y - ref)[mask].abs().max().item() < 1e-10 * ref.abs().max().item()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_a_band_over_the_sequence_without_far_field_is_softmax_attention(causal):
    """The paper's decomposition A = D + L: with D the whole (causal) matrix and L weighted 0, exact attention."""
    n = 23
    m, _, _ = make_op("mha", "fmm", d=D, heads=4, causal=causal, kv_heads=2, w=n, kernels=2)
    perturb_params(m)
    with torch.no_grad():
        m.near.fill_(1.0)
        m.far.zero_()
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    q, k, v = (t.transpose(1, 2) for t in head_projections(m, x))
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(m.head_dim)
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    exact = output_projection(m, (s.softmax(-1) @ v).transpose(1, 2).reshape(2, n, -1))
    with torch.no_grad():
        torch.testing.assert_close(m(x, Ctx()), exact, rtol=1e-10, atol=1e-10)
