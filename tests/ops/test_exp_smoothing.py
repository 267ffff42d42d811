"""mha(exp_smoothing) against ETSformer's equation, in float64: per head, o_t = sum_{j<=t} alpha (1 - alpha)^(t-j) V_j +
(1 - alpha)^t v_0 (t = 1..n), written here as the recurrence o_t = alpha V_t + (1 - alpha) o_(t-1) from o_0 = v_0,
token by token from the projections' weights; learned per-head and fixed alpha, head_dim set, n below, at and past
the 64-token chunk; the export's dense form equals the chunked one; left and right padding give each sequence alone;
a bidirectional model and bad alphas are refused. Decoding: tests/test_decode.py; leaks: tests/ops/test_leaks.py."""
from __future__ import annotations

import pytest
import torch

from evodsl import EvoError, parse
from evodsl.ops import Ctx
from ophelpers import assert_no_leak, make_op, perturb_params

D = 32


def reference(m, x):
    b, n, _ = x.shape
    h, dh = m.heads, m.head_dim
    v = (x @ m.v_proj.weight.T + (0 if m.v_proj.bias is None else m.v_proj.bias)).view(b, n, h, dh)
    alpha = torch.sigmoid(m.alpha_logit) if m.alpha_logit is not None else torch.full((h,), m.fixed, dtype=x.dtype)
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for hh in range(h):
        a = alpha[hh].item()
        o = m.initial[hh].expand(b, dh)
        for t in range(n):
            o = a * v[:, t, hh] + (1 - a) * o
            out[:, t, hh] = o
    out = out.reshape(b, n, h * dh)
    return out @ m.o_proj.weight.T + (0 if m.o_proj.bias is None else m.o_proj.bias)


CASES = [  # n, build
    (1, {}), (7, {}), (64, {}), (130, {}),  # below, at and past the 64-token chunk (a partial last one)
    (37, {"alpha": 0.3}), (70, {"alpha": 0.9, "heads": 2, "head_dim": 8, "bias": False}),
]


@pytest.mark.parametrize("n, build", CASES)
def test_exp_smoothing_matches_equation(n, build):
    m, _, _ = make_op("mha", "exp_smoothing", d=D, causal=True, **{"heads": 4, **build})
    perturb_params(m)
    m.chunk = 16 if n == 70 else m.chunk  # several chunks at a small n too
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference(m, x)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        v = m.v_proj(x).view(2, n, m.heads, m.head_dim)
        log_keep, a = m.log_keep(torch.float64)
        assert (m._dense(v, log_keep, a) - m._chunked(v, log_keep, a)).abs().max().item() < 1e-12


def test_alpha_near_one_is_the_values_and_the_heads_differ():
    """alpha -> 1: each output is its own token's value (the smoothing forgets at once); learned alphas are per head."""
    m, _, _ = make_op("mha", "exp_smoothing", d=D, causal=True, heads=4, alpha=1 - 1e-12)
    perturb_params(m)
    x = torch.randn(2, 20, D, dtype=torch.float64)
    with torch.no_grad():
        assert (m(x, Ctx()) - m.o_proj(m.v_proj(x))).abs().max().item() < 1e-9
    m, _, _ = make_op("mha", "exp_smoothing", d=D, causal=True, heads=4)
    perturb_params(m)
    assert m.alpha_logit.shape == (4,) and m.initial.shape == (4, 8)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_gives_each_sequence_alone(side):
    m, _, _ = make_op("mha", "exp_smoothing", d=D, causal=True, heads=4)
    perturb_params(m)
    m.chunk = 8
    lengths, n = [30, 17, 1], 30
    x = torch.randn(3, n, D, dtype=torch.float64)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    mask = mask.flip(1) if side == "left" else mask
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        for i in range(3):
            alone = m(x[i:i + 1, mask[i]], Ctx())
            assert (y[i, mask[i]] - alone[0]).abs().max().item() < 1e-12


def test_causal():
    m, _, _ = make_op("mha", "exp_smoothing", d=D, causal=True, heads=4)
    perturb_params(m)
    m.chunk = 8
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=30, d=D)


def test_refusals():
    with pytest.raises(EvoError, match=r"E\d+.*causal only"):
        parse("model m = input(features, d=32) -> mha(exp_smoothing, heads=4)")
    for bad in ("alpha=1.5", "alpha=0.0"):
        with pytest.raises(EvoError, match="alpha"):
            parse(f"model m(causal=true) = input(features, d=32) -> mha(exp_smoothing, {bad})")
