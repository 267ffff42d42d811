"""mha(local) against its defining equation: a full masked n x n softmax, computed here in float64.

That it grows as O(n w) in FLOPs and bytes is held by the growth harness (test_growth.py)."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl.ops import Ctx, load_all, lookup
from ophelpers import assert_no_leak, make_op, perturb_params
from .test_positions import ref_rope

D = 32


def require_pos(pos):
    """Every position scheme a test names is registered: a missing one is a failure, not a skip."""
    load_all()
    assert pos is None or lookup("pos", pos[0]) is not None, f"pos({pos[0]}) is not registered"


def project(m, x, pos=None):
    """q [b, h, n, dh], k, v [b, kv, n, dh] from the weights; with pos = ("rope", {...}), q and k turned by the
    RoFormer rotation written in test_positions (ref_rope), not by the module's."""
    b, n, _ = x.shape

    def lin(layer, heads):
        y = x @ layer.weight.T + (0 if layer.bias is None else layer.bias)
        return y.view(b, n, heads, m.head_dim).transpose(1, 2)

    q, k, v = lin(m.q_proj, m.heads), lin(m.k_proj, m.kv_heads), lin(m.v_proj, m.kv_heads)
    if pos is not None and pos[0] == "rope":
        base, rot = pos[1].get("base", 10000.0), int(m.head_dim * pos[1].get("fraction", 1.0))
        q, k = ref_rope(q, base, rot), ref_rope(k, base, rot)
    return q, k, v


def position_bias(pos, heads, t, r):
    """ALiBi (Press et al. 2022): -m_h |t - r| with m_h = 2^(-8h/H), h = 1..H (H a power of two); else None."""
    if pos is None or pos[0] != "alibi":
        return None
    assert heads & (heads - 1) == 0
    slopes = torch.tensor([2.0 ** (-8 * h / heads) for h in range(1, heads + 1)], dtype=torch.float64)
    return -slopes[:, None, None] * (t - r).abs()


def reference_local(m, x, window, causal, pos=None, scale=None):
    """o_t = sum_r softmax_r(q_t.k_r / sqrt(dh) + bias) v_r over causal t-w+1 <= r <= t or |t-r| < w (scale:
    q_t.k_r * scale)."""
    q, k, v = project(m, x, pos)
    b, h, n, dh = q.shape
    group = h // k.shape[1]
    t, r = torch.arange(n)[:, None], torch.arange(n)[None, :]
    band = ((t - r >= 0) & (t - r < window)) if causal else ((t - r).abs() < window)
    bias = position_bias(pos, h, t, r)
    heads = []
    for hh in range(h):
        s = q[:, hh] @ k[:, hh // group].transpose(-1, -2) * (scale or 1 / math.sqrt(dh))
        if bias is not None:
            s = s + bias[hh]
        s = s.masked_fill(~band, float("-inf"))
        heads.append(s.softmax(-1) @ v[:, hh // group])
    o = torch.stack(heads, 1).transpose(1, 2).reshape(b, n, h * dh)
    return o @ m.o_proj.weight.T + m.o_proj.bias


CASES = [  # causal, window, n, kv_heads, pos
    (True, 5, 77, None, None),  # three blocks of 32, the last one partial
    (False, 5, 77, 2, None),  # grouped-query, 2 K/V heads for 4 query heads
    (True, 40, 150, 2, None),  # blocks of 39: four, the last one partial
    (False, 40, 150, None, None),
    (True, 100, 40, None, None),  # n < window: one block, every earlier key
    (False, 100, 40, 2, None),
    (False, 1, 37, None, None),  # each token attends only itself
    (True, 7, 50, None, ("rope", {})),
    (False, 7, 50, 2, ("rope", {"fraction": 0.5, "base": 100.0})),
    (True, 7, 50, 2, ("alibi", {})),
    (False, 7, 50, None, ("alibi", {})),
]


@pytest.mark.parametrize("causal, window, n, kv_heads, pos", CASES)
def test_local_matches_equation(causal, window, n, kv_heads, pos):
    require_pos(pos)
    m, _, _ = make_op("mha", "local", d=D, causal=causal, pos=pos, heads=4, kv_heads=kv_heads, window=window)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference_local(m, x, window, causal, pos)
        assert (y - ref).abs().max().item() < 1e-10
        if window < n:  # the comparison sees the window's edge
            assert (y - reference_local(m, x, window + 1, causal, pos)).abs().max().item() > 1e-6


@pytest.mark.parametrize("causal, window, n, kv_heads, pos", [
    (True, 5, 77, 2, None), (False, 7, 50, None, ("alibi", {})), (True, 7, 50, 2, ("rope", {})), (True, 100, 40, 1, None)])
def test_local_scale_matches_equation(causal, window, n, kv_heads, pos):
    """scale=s (Gemma 2's query_pre_attn_scalar^-1/2): scores q.k * s, on the SDPA paths (q pre-multiplied)."""
    require_pos(pos)
    m, _, _ = make_op("mha", "local", d=D, causal=causal, pos=pos, heads=4, kv_heads=kv_heads, window=window, scale=0.2)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        assert (y - reference_local(m, x, window, causal, pos, scale=0.2)).abs().max().item() < 1e-10
        assert (y - reference_local(m, x, window, causal, pos)).abs().max().item() > 1e-4  # 0.2 is not 1/sqrt(8)


def test_local_causal_does_not_leak():
    m, _, _ = make_op("mha", "local", d=D, causal=True, heads=4, kv_heads=2, window=6)
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=70, d=D)


def test_local_bidirectional_leaks():
    m, _, _ = make_op("mha", "local", d=D, causal=False, heads=4, window=6)
    perturb_params(m)
    with torch.no_grad(), pytest.raises(AssertionError, match="changed by"):
        assert_no_leak(lambda x: m(x, Ctx()), n=40, d=D)
