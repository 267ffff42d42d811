"""head(pooler) and residual(rezero) against their equations, in float64."""
from __future__ import annotations

import pytest
import torch

from evodsl.ops import OpEnv, ShapeProblem, load_all, lookup
from ophelpers import make_op, perturb_params

D = 24


def _h(seed: int = 9, shape=(3, 6, D)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def test_pooler_matches_equation():
    m, _, _ = make_op("head", "pooler", d=D)
    perturb_params(m)
    h = _h()
    z = h[:, 0, :] @ m.dense.weight.T + m.dense.bias  # W h_0 + b
    ref = (torch.exp(z) - torch.exp(-z)) / (torch.exp(z) + torch.exp(-z))  # tanh, written out
    y = m(h)
    assert y.shape == (3, D)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


def test_pooler_reads_the_first_token_only():
    m, _, _ = make_op("head", "pooler", d=D)
    perturb_params(m)
    h = _h()
    h2 = h.clone()
    h2[:, 1:] = _h(seed=10)[:, 1:]
    torch.testing.assert_close(m(h2), m(h), rtol=0, atol=0)
    h2[:, 0] += 1.0
    assert (m(h2) - m(h)).abs().max() > 1e-3


def test_pooler_shape_rule_and_params():
    load_all()
    op = lookup("head", "pooler")
    p = op.params()
    assert op.shape(p, OpEnv(in_shapes=(("b", "n", D),))) == ("b", D)
    assert op.shape(p, OpEnv(in_shapes=((4, 16, 768),))) == (4, 768)
    with pytest.raises(ShapeProblem):
        op.shape(p, OpEnv(in_shapes=(("b", D),)))
    m, _, _ = make_op("head", "pooler", d=768, dtype=torch.float32)
    assert sum(t.numel() for t in m.parameters()) == 768 * 768 + 768  # = HF BertPooler
    assert [n for n, _ in m.named_parameters()] == ["dense.weight", "dense.bias"]


def test_rezero_starts_at_zero_and_scales_the_branch():
    m, _, _ = make_op("residual", "rezero", d=D)
    assert [n for n, _ in m.named_parameters()] == ["alpha"]
    assert m.alpha.item() == 0.0 and m.alpha.numel() == 1
    fx = _h()
    assert torch.equal(m(fx), torch.zeros_like(fx))  # the block is the identity at init
    with torch.no_grad():
        m.alpha.fill_(0.37)
    torch.testing.assert_close(m(fx), 0.37 * fx, rtol=1e-12, atol=0)
    perturb_params(m)
    torch.testing.assert_close(m(fx), m.alpha * fx, rtol=1e-12, atol=0)


def test_rezero_alpha_gets_a_gradient():
    m, _, _ = make_op("residual", "rezero", d=D)
    fx = _h()
    x = _h(seed=11)
    (x + m(fx)).sum().backward()  # d/dalpha sum(x + alpha f) = sum(f)
    torch.testing.assert_close(m.alpha.grad, fx.sum(), rtol=1e-12, atol=1e-12)
