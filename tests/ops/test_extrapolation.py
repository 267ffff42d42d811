"""Length extrapolation, where the papers' claim is a formula (issue 13): the score biases of ALiBi and KERPLE and
xPos's decay fall with distance (KERPLE's and xPos's own files check their kernels exactly; here the three side by
side, past any training length), and RoPE with YaRN keeps the attention entropy at 4x original_max_len near the
trained length's. The measured table is benchmarks/bench_extrapolation.py's."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl.ops import load_all, lookup

load_all()


def attach(variant, heads=8, head_dim=16, **kw):
    op = lookup("pos", variant)
    torch.manual_seed(0)
    return op.attach(op.params(**kw), heads, head_dim).to(torch.float64)


@pytest.mark.parametrize("variant, kw", [("alibi", {}), ("kerple", {"kind": "log"}), ("kerple", {"kind": "power"})])
def test_score_bias_falls_with_distance(variant, kw):
    """bias(m, n) for the last query of 4096 against every key: 0 at distance 0, strictly falling with m − n for
    every head, and the same for every query (relative): nothing to relearn past the training length."""
    m = attach(variant, **kw)
    n = 4096
    i, j = torch.tensor([[n - 1]]), torch.arange(n)[None, :]
    row = m.bias(i, j)[:, 0].flip(-1)  # [h, distance 0..n-1]
    assert (row[:, 0] == 0).all() and (row[:, 1:] < row[:, :-1]).all()
    assert torch.allclose(m.bias(i - 100, j[:, : n - 100])[:, 0].flip(-1), row[:, : n - 100], rtol=1e-12, atol=0)


def test_xpos_decay_factor_falls_with_distance():
    """xPos: the factor on pair i's score is ζ_i^((m−n)/B) (q's scale times k's), < 1 and falling for m > n, for
    every pair, and 1 at m = n; at the same distance it is the same at any position."""
    m = attach("xpos", head_dim=32, scale_base=512.0)
    for start in (0, 3000):
        up = m.decay(4096, None, torch.float64, start)  # ζ^(t/B) at t = start..
        factor = up[-1:] / up  # q at the last position, k at each: ζ^((m − n)/B)
        row = factor.flip(0)  # distance 0..4095
        assert torch.allclose(row[0], torch.ones(16, dtype=torch.float64), atol=1e-12, rtol=0)
        assert (row[1:] < row[:-1]).all()
        zeta = torch.tensor([(2 * i / 32 + 0.4) / 1.4 for i in range(16)], dtype=torch.float64)
        assert torch.allclose(row[4095], zeta ** (4095 / 512), rtol=1e-9, atol=0)


def _entropy(rotary, n, d=64, b=16, h=4, seed=0):
    """Mean entropy of the last query's softmax(q·k / sqrt(d)) over n keys, q and k standard normal (logits of
    variance 1 before YaRN's factor), turned by `rotary`."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, 1, d, generator=g, dtype=torch.float64).expand(b, h, n, d)  # one query at every row
    k = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    q, k = rotary.rotate(q, k)
    w = (q[:, :, -1:] @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1)
    return -(w * w.log()).sum(-1).mean().item()


def test_yarn_keeps_the_entropy_near_the_trained_length():
    """YaRN §3.4: past the trained length L the softmax flattens (its entropy grows as ln n), and the temperature
    sqrt(1/t) = 0.1 ln s + 1 on q and k sharpens it back. For logits of variance σ² the entropy over n keys is
    ln n − σ²/2 (log-normal weights, n large), and YaRN multiplies σ² by t^-2. At 4L (s = 4, σ = 1): the
    formula within 0.03 for both, and YaRN's growth over L, ln 4 − (t^-2 − 1)/2 ≈ 1.05, below plain RoPE's
    ln 4 ≈ 1.39 by the formula's 0.34 (± 0.05)."""
    L, d = 256, 64
    rope = attach("rope", heads=4, head_dim=d)
    yarn = attach("rope", heads=4, head_dim=d, scaling="yarn", factor=4.0, original_max_len=L)
    inv_t2 = (0.1 * math.log(4.0) + 1) ** 4
    trained, plain, scaled = _entropy(rope, L), _entropy(rope, 4 * L), _entropy(yarn, 4 * L)
    assert abs(trained - (math.log(L) - 0.5)) < 0.03
    assert abs(plain - (math.log(4 * L) - 0.5)) < 0.03
    assert abs(scaled - (math.log(4 * L) - inv_t2 / 2)) < 0.03
    assert abs((plain - scaled) - (inv_t2 - 1) / 2) < 0.05 and scaled - trained < math.log(4) - 0.25
