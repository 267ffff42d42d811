"""The shared FFT convolution (evodsl/ops/longconv/_fftconv.py) against the direct sums, in float64: causal
y_t = sum_{s <= t} k_s u_{t-s}, two-sided y_t += sum_{s >= 1} k'_{s-1} u_{t+s}; and the decoding step's direct form."""
from __future__ import annotations

import pytest
import torch

from evodsl.ops.longconv._fftconv import causal_tail, fft_conv


def direct(u, k, k_back=None):
    b, c, n = u.shape
    y = torch.zeros_like(u)
    for t in range(n):
        for s in range(t + 1):
            y[..., t] += k[:, s] * u[..., t - s]
        if k_back is not None:
            for s in range(1, n - t):
                y[..., t] += k_back[:, s - 1] * u[..., t + s]
    return y


@pytest.mark.parametrize("n", [1, 2, 7, 16, 33])
@pytest.mark.parametrize("two", [False, True])
def test_fft_conv_equals_the_direct_sum(n, two):
    g = torch.Generator().manual_seed(n)
    u, k, kb = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 3, n), (3, n), (3, n)))
    want = direct(u, k, kb if two else None)
    got = fft_conv(u, k, kb if two else None)
    assert (got - want).abs().max().item() <= 1e-12 * max(want.abs().max().item(), 1)


@pytest.mark.parametrize("m", [1, 3, 9])
def test_the_step_form_is_the_tail_of_the_convolution(m):
    g = torch.Generator().manual_seed(m)
    u, k = torch.randn(2, 3, 9, generator=g, dtype=torch.float64), torch.randn(3, 12, generator=g, dtype=torch.float64)
    want = direct(u, k[:, :9])[..., 9 - m:]
    assert (causal_tail(u, k, m) - want).abs().max().item() <= 1e-12 * want.abs().max().item()
