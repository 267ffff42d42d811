"""The causal band's two code paths (inference: a causal SDPA prefix, then one SDPA call per block on slices;
autograd: all blocks in one call) equal the gathered band (one query's keys at a time), values and gradients,
with and without a per-head bias and a padding mask, at n spanning several blocks and at w >= n (one call)."""
from __future__ import annotations

import pytest
import torch

from evodsl.ops.attention._banded import _gathered_band, banded_attention


@pytest.mark.parametrize("n,w", [(50, 7), (130, 40), (200, 64), (30, 64), (97, 1)])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("pad", [False, True])
def test_causal_band_paths_agree(n, w, use_bias, pad):
    g = torch.Generator().manual_seed(n + w)
    h, dh = 4, 8
    q, k, v = (torch.randn(2, h, n, dh, dtype=torch.float64, generator=g) for _ in range(3))
    slopes = torch.rand(h, dtype=torch.float64, generator=g)
    def bias(i, j):  # [h, *dist]: the blocked form passes 3-D positions, the others 2-D
        dist = (i - j).abs()
        return -slopes.view(-1, *(1,) * dist.dim()) * dist

    bias = bias if use_bias else None
    km = None
    if pad:
        km = torch.ones(2, n, dtype=torch.bool)
        km[0, :5], km[1, -7:] = False, False
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = _gathered_band(*leaves, w - 1, 0, bias, 0.0, km)
    grad = torch.randn(ref.shape, dtype=ref.dtype, generator=g)
    want = torch.autograd.grad(ref, leaves, grad)
    with torch.no_grad():
        assert (banded_attention(q, k, v, w - 1, 0, bias, key_mask=km) - ref).abs().max() < 1e-10
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    got = banded_attention(*leaves, w - 1, 0, bias, key_mask=km)
    assert (got - ref).abs().max() < 1e-10
    for a, b in zip(torch.autograd.grad(got, leaves, grad), want):
        assert (a - b).abs().max() < 1e-9
