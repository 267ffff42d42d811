"""mha(logsparse) against its defining equation, in float64: per query, the key set {t - j : j < w} u
{t - (w - 1) - 2^i} built by plain Python (Li et al. 2019, sec. 3.3; w = 1 the LogSparse set, w > 1 the local
variant), q and k by an explicit causal convolution of kernel k (sec. 3.2), one softmax; causal and
bidirectional, GQA, odd lengths; padding, the export's fixed gather, decoding."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl.ops import Ctx
from ophelpers import assert_no_leak, head_projections, make_op, output_projection, perturb_params

D = 32


def key_set(w: int, causal: bool, n: int, t: int) -> list[int]:
    dist = set(range(w))
    i = 0
    while w - 1 + 2 ** i < n:
        dist.add(w - 1 + 2 ** i)
        i += 1
    keys = {t - j for j in dist} | (set() if causal else {t + j for j in dist})
    return sorted(r for r in keys if 0 <= r < n)


def projections(m, x, conv):
    """q, k, v [b, n, heads, dh]: with conv = k, q_t = sum_j W[:, :, j] x_{t - k + 1 + j} + bias (zeros before 0)."""
    if conv == 1:
        return head_projections(m, x)
    b, n, _ = x.shape
    vp = m.v_proj
    v = (x @ vp.weight.T + (0 if vp.bias is None else vp.bias)).view(b, n, m.kv_heads, m.head_dim)

    def causal_conv(layer, heads):
        wgt = layer.weight  # [out, d, k]
        y = torch.zeros(b, n, wgt.shape[0], dtype=x.dtype)
        for t in range(n):
            for j in range(conv):
                src = t - conv + 1 + j
                if src >= 0:
                    y[:, t] += x[:, src] @ wgt[:, :, j].T
        return (y + (0 if layer.bias is None else layer.bias)).view(b, n, heads, m.head_dim)

    return causal_conv(m.q_proj, m.heads), causal_conv(m.k_proj, m.kv_heads), v


def reference(m, x, w, conv, causal, keep=None):
    b, n, _ = x.shape
    h, g, dh = m.heads, m.kv_heads, m.head_dim
    if keep is not None and conv > 1:
        x = x * keep[..., None]
    q, k, v = projections(m, x, conv)
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        for t in range(n):
            keys = key_set(w, causal, n, t)
            if keep is not None:
                keys = [r for r in keys if keep[bb, r]] or [t]
            for hh in range(h):
                kh = hh // (h // g)
                s = torch.stack([q[bb, t, hh] @ k[bb, r, kh] for r in keys]) / math.sqrt(dh)
                wt = torch.softmax(s, 0)
                out[bb, t, hh] = sum(wt[i] * v[bb, r, kh] for i, r in enumerate(keys))
    return output_projection(m, out.reshape(b, n, h * dh))


CASES = [(1, 1, 29, None), (1, 3, 40, 2), (4, 1, 23, 1), (3, 2, 7, None), (8, 1, 5, 2), (1, 1, 1, None)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("w,conv,n,kv_heads", CASES)
def test_logsparse_matches_equation(w, conv, n, kv_heads, causal):
    m, _, _ = make_op("mha", "logsparse", d=D, heads=4, kv_heads=kv_heads, causal=causal, window=w, conv=conv)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n + w), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference(m, x, w, conv, causal)
    assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


def test_the_key_sets_are_logarithmic():
    """w + floor(log2(n - w)) + 1 keys at most: 1 + 10 at n = 1024, w = 1 (the paper's O(log n) per cell)."""
    assert max(len(key_set(1, True, 1024, t)) for t in range(1024)) == 11
    assert key_set(1, True, 64, 13) == [5, 9, 11, 12, 13]
    assert key_set(3, True, 64, 20) == [2, 10, 14, 16, 17, 18, 19, 20]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("w,conv", [(1, 1), (2, 3)])
def test_padded_keys_are_left_out(w, conv, causal):
    m, _, _ = make_op("mha", "logsparse", d=D, heads=2, causal=causal, window=w, conv=conv)
    perturb_params(m)
    n = 23
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[0, :6] = False  # left padding
    keep[1, 15:] = False  # right padding
    with torch.no_grad():
        y, ref = m(x, Ctx(mask=keep)), reference(m, x, w, conv, causal, keep)
    assert (y - ref)[keep].abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize("w,conv", [(1, 1), (3, 4)])
def test_causal_logsparse_does_not_leak(w, conv):
    m, _, _ = make_op("mha", "logsparse", d=D, heads=2, kv_heads=1, causal=True, window=w, conv=conv)
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=33, d=D)


@pytest.mark.parametrize("causal", [True, False])
def test_export_gather_is_the_same_attention(causal):
    """The export's fixed gather (LOG_MAX log-spaced keys, those past the sequence masked) equals the exact one."""
    from evodsl.ops.attention.logsparse import LOG_MAX, log_sparse, offsets
    g = torch.Generator().manual_seed(1)
    n = 37
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for _ in range(3))
    want = log_sparse(q, k, v, offsets(n, 2, causal))
    got = log_sparse(q, k, v, offsets(LOG_MAX, 2, causal, LOG_MAX))
    assert (got - want).abs().max().item() < 1e-12
