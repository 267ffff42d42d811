"""mha(adaptive_span) against its defining equation, computed here in float64 with the soft mask applied
literally: a_tr = m_z(x) exp(s_tr) / sum_q m_z(x_tq) exp(s_tq), m_z(x) = clamp((R + z - x) / R, 0, 1).

Also: the span penalty, the gradient reaching the spans, and the causal leak check (its O(n S) growth: test_growth.py)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from evodsl.ops import Ctx, OpEnv, ShapeProblem, lookup
from ophelpers import assert_no_leak, make_op, perturb_params
from .test_local import position_bias, project, require_pos

D = 32


def reference_adaptive_span(m, x, S, R, p, causal, pos=None):
    """Per head, z = S clamp(p, 0, 1); keys r in W(t) (causal: 0 <= t-r <= S-1, bidirectional: |t-r| < S)."""
    q, k, v = project(m, x, pos)
    b, h, n, dh = q.shape
    group = h // k.shape[1]
    t, r = torch.arange(n)[:, None], torch.arange(n)[None, :]
    dist = ((t - r) if causal else (t - r).abs()).to(torch.float64)
    band = (dist >= 0) & (dist <= S - 1)
    bias = position_bias(pos, h, t, r)
    heads = []
    for hh in range(h):
        z = S * min(max(p[hh], 0.0), 1.0)
        mask = ((R + z - dist) / R).clamp(0.0, 1.0) * band
        s = q[:, hh] @ k[:, hh // group].transpose(-1, -2) / math.sqrt(dh)
        if bias is not None:
            s = s + bias[hh]
        e = mask * torch.exp(s - s.max(-1, keepdim=True).values)  # m_z(t-r) exp(s_tr), shifted for range
        heads.append((e / e.sum(-1, keepdim=True)) @ v[:, hh // group])
    o = torch.stack(heads, 1).transpose(1, 2).reshape(b, n, h * dh)
    return o @ m.o_proj.weight.T + m.o_proj.bias


def build(causal, S, R, p, pos=None, kv_heads=None, penalty=2e-6, dtype=torch.float64):
    m, _, _ = make_op("mha", "adaptive_span", d=D, causal=causal, pos=pos, heads=len(p), kv_heads=kv_heads,
                      max_span=S, R=R, penalty=penalty, dtype=dtype)
    perturb_params(m)
    with torch.no_grad():
        m.span.copy_(torch.tensor(p, dtype=dtype))
    return m


P_MIXED = [0.1, 0.5, 1.2, -0.3]  # z = 1.2, 6, 12 (clamped), 0 with S = 12: ramps, full span, ramp only
P_SHORT = [0.1, 0.2, 0.05, 0.0]  # z = 4.8, 9.6, 2.4, 0 with S = 48: the band is cut to distance 13
P_LONG = [0.2, 0.9, 0.63, 1.0]
CASES = [  # causal, S, R, n, p, kv_heads, pos
    (True, 12, 4, 40, P_MIXED, None, None),  # blocks of 32: two, the second partial
    (False, 12, 4, 40, P_MIXED, 2, None),  # grouped-query
    (True, 48, 4, 70, P_SHORT, 2, None),
    (False, 48, 4, 70, P_SHORT, None, None),
    (True, 40, 8, 130, P_LONG, None, None),  # blocks of 39: four, the last one partial
    (False, 40, 8, 130, P_LONG, 2, None),
    (True, 100, 8, 30, [0.03, 0.2, 0.5, 1.0], None, None),  # n < max_span: one block
    (False, 100, 8, 30, [0.03, 0.2, 0.5, 1.0], 2, None),
    (True, 12, 4, 40, P_MIXED, None, ("rope", {})),
    (False, 12, 4, 40, P_MIXED, 2, ("rope", {"fraction": 0.5, "base": 100.0})),
    (True, 12, 4, 40, P_MIXED, 2, ("alibi", {})),
    (False, 12, 4, 40, P_MIXED, None, ("alibi", {})),
]


@pytest.mark.parametrize("causal, S, R, n, p, kv_heads, pos", CASES)
def test_adaptive_span_matches_equation(causal, S, R, n, p, kv_heads, pos):
    require_pos(pos)
    m = build(causal, S, R, p, pos, kv_heads)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        assert (y - reference_adaptive_span(m, x, S, R, p, causal, pos)).abs().max().item() < 1e-10
        other = [v + 0.02 for v in p]  # the comparison sees the spans
        assert (y - reference_adaptive_span(m, x, S, R, other, causal, pos)).abs().max().item() > 1e-6


def test_aux_loss_is_penalty_times_mean_span():
    m = build(True, 12, 4, P_MIXED, penalty=0.01)
    z = [1.2, 6.0, 12.0, 0.0]
    assert m.aux_loss().item() == pytest.approx(0.01 * sum(z) / 4, rel=1e-12)


def test_gradient_reaches_spans():
    m = build(True, 12, 4, [0.13, 0.41, 0.77, 0.29])  # spans off the kinks of m_z at integer distances
    x = torch.randn(1, 20, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    probe = torch.randn(1, 20, D, generator=torch.Generator().manual_seed(8), dtype=torch.float64)

    def f(span):  # one scalar output: one backward pass per gradcheck
        return (functional_call(m, {"span": span}, (x, Ctx())) * probe).sum()

    assert torch.autograd.gradcheck(f, (m.span.detach().clone().requires_grad_(),))
    (m(x, Ctx()).square().sum() + m.aux_loss()).backward()
    assert (m.span.grad.abs() > 0).all()


def test_gradient_stops_outside_clamp():
    m = build(False, 12, 4, [1.5, 0.4, -0.5, 0.6])
    x = torch.randn(1, 20, D, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    m(x, Ctx()).square().sum().backward()
    g = m.span.grad
    assert g[0] == 0 and g[2] == 0 and g[1] != 0 and g[3] != 0


def test_adaptive_span_causal_does_not_leak():
    m = build(True, 12, 4, P_MIXED, kv_heads=2)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=50, d=D)


def test_adaptive_span_bidirectional_leaks():
    m = build(False, 12, 4, P_MIXED)
    with torch.no_grad(), pytest.raises(AssertionError, match="changed by"):
        assert_no_leak(lambda x: m(x, Ctx()), n=30, d=D)


def test_ramp_longer_than_max_span_is_a_shape_problem():
    op = lookup("mha", "adaptive_span")
    with pytest.raises(ShapeProblem) as err:
        op.shape(op.params(R=64, max_span=32), OpEnv(in_shapes=(("b", "n", D),)))
    assert err.value.field == "R"
