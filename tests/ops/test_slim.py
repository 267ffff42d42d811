"""mha(slim) against its defining equation in float64 (Performer's, tests/ops/test_performer.py's reference on the
module's own draw W), causal over several chunk sizes with grouped K/V heads; its reversible backward against
autograd through the plain prefix sums (gradcheck and the module's input gradient against mha(performer)'s on
the same weights); training keeps no per-chunk state (its saved bytes do not grow with n beyond the features')."""
from __future__ import annotations

import pytest
import torch

from evodsl.ops import load_all, lookup
from evodsl.ops.attention.slim import _ChunkedPrefixSums
from ophelpers import make_op, perturb_params
from tests.ops.test_performer import reference

D = 32


def _x(b, n, seed=3):
    return torch.randn(b, n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("n,chunk,heads,kv_heads,features", [
    (100, 64, 4, 4, 32), (20, 64, 4, 4, 20), (29, 8, 4, 2, 24), (37, 5, 4, 1, 5), (64, 16, 2, 2, 16)])
def test_slim_equation(causal, n, chunk, heads, kv_heads, features):
    m, _, _ = make_op("mha", "slim", d=D, causal=causal, heads=heads, kv_heads=kv_heads, features=features, chunk=chunk)
    perturb_params(m)
    x = _x(2, n)
    with torch.no_grad():
        want = reference(m, x, causal)
        assert (m(x, None) - want).abs().max() <= 1e-10 * want.abs().max()


def test_reversible_backward_gradcheck():
    g = torch.Generator().manual_seed(0)
    fq, fk = (torch.rand(1, 2, 11, 3, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    v = torch.randn(1, 2, 11, 4, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: _ChunkedPrefixSums.apply(a, b, c, 4), (fq, fk, v))


def test_gradient_equals_performers():
    """The same weights in mha(performer) (autograd through its chunked form) and mha(slim): the input's and
    every parameter's gradients agree to 1e-8 relative (measured 1.5e-9: the state recovered by subtraction
    loses a few digits to cancellation, the price of the reversible scheme)."""
    x = _x(2, 45).requires_grad_()
    grads = []
    for variant, extra in (("performer", {}), ("slim", {"chunk": 8})):
        m, _, _ = make_op("mha", variant, d=D, causal=True, heads=4, kv_heads=2, features=12, seed=0, **extra)
        perturb_params(m)
        m(x, None).square().sum().backward()
        grads.append([x.grad.clone(), *(p.grad.clone() for p in m.parameters())])
        x.grad = None
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-8 * b.abs().max()


def test_params():
    load_all()
    op = lookup("mha", "slim")
    assert op.causal == "yes" and op.decode_form(None) and op.params(chunk=8).chunk == 8


def test_training_keeps_no_chunk_state():
    """Measured bytes kept for the backward: mha(performer) keeps its per-chunk states and the n x C products,
    mha(slim) neither (its final state only): the difference is those, b h ((n / C - 1) m (dh + 1) + n C) floats
    (measured exactly that, and a bool mask)."""
    from costhelpers import declared, make_input, measure_op
    b, n, c, m_f, h, dh = 2, 128, 16, 32, 4, 16
    kept = {}
    for variant in ("performer", "slim"):
        module, env, _, _ = declared("mha", variant, b, n, d=64, heads=h, features=m_f, causal=True)
        module.chunk = c
        kept[variant] = measure_op(module, make_input(env, b, n, torch.float32))["saved"]
    assert kept["performer"] - kept["slim"] >= 4 * b * h * ((n // c - 1) * m_f * (dh + 1) + n * c), kept
