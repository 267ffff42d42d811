"""mha(simpletron) against its defining equation, in float64: per head (1/sqrt(n)) Q (K^T V), computed here the
other way round, from the n x n products Q K^T (an explicit loop over queries); causal, 1/sqrt(i + 1) over
j <= i; padding counts each sequence's own keys; the chunked causal form across chunk sizes."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl.ops import Ctx, OpEnv, ShapeProblem, load_all, lookup
from ophelpers import assert_no_leak, head_projections, make_op, output_projection, perturb_params

D = 32


def reference_simpletron(m, x, causal, mask=None):
    """o_i = |J_i|^(-1/2) sum_{j in J_i} (q_i . k_j) v_j, J_i the real keys (causal: j <= i)."""
    b, n, _ = x.shape
    h, g, dh = m.heads, m.kv_heads, m.head_dim
    q, k, v = head_projections(m, x)
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    real = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    for hh in range(h):
        qh, kh, vh = q[:, :, hh], k[:, :, hh // (h // g)], v[:, :, hh // (h // g)]
        scores = torch.einsum("bic,bjc->bij", qh, kh)  # Q K^T, n x n, here only
        for i in range(n):
            keep = real.clone()
            if causal:
                keep[:, i + 1:] = False
            count = keep.sum(-1, keepdim=True).clamp(min=1).to(x.dtype)
            out[:, i, hh] = torch.einsum("bj,bje->be", scores[:, i] * keep, vh) / torch.sqrt(count)
    return output_projection(m, out.reshape(b, n, h * dh))


CASES = [  # (n, chunk, heads, kv_heads)
    (40, 64, 4, None),  # one chunk
    (29, 8, 4, 2),  # many chunks and a remainder, grouped K/V heads
    (37, 8, 4, 1),  # multi-query
    (64, 16, 2, None),  # n a multiple of the chunk
    (17, 4, 4, 4),
]


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("n,chunk,heads,kv_heads", CASES)
def test_simpletron_matches_equation(causal, n, chunk, heads, kv_heads):
    m, _, _ = make_op("mha", "simpletron", d=D, causal=causal, heads=heads, kv_heads=kv_heads)
    m.chunk = chunk
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference_simpletron(m, x, causal)
    assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
def test_padding_counts_the_real_keys(causal, left):
    m, _, _ = make_op("mha", "simpletron", d=D, causal=causal, heads=4, kv_heads=2)
    m.chunk = 8
    perturb_params(m)
    x = torch.randn(3, 21, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mask = torch.arange(21)[None, :] < torch.tensor([[21], [13], [5]])
    if left:
        mask = mask.flip(1)
    with torch.no_grad():
        y, ref = m(x, Ctx(mask=mask)), reference_simpletron(m, x, causal, mask)
    assert (y - ref).abs().max().item() < 1e-10 * ref.abs().max().item()


def test_the_scale_is_one_over_sqrt_n():
    """Repeating the sequence twice doubles K^T V and multiplies the scale by 1/sqrt(2): the output grows by
    sqrt(2) (before o_proj's bias)."""
    m, _, _ = make_op("mha", "simpletron", d=D, heads=4)
    perturb_params(m)
    x = torch.randn(1, 10, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx()) - m.o_proj.bias
        y2 = m(torch.cat([x, x], 1), Ctx())[:, :10] - m.o_proj.bias
    assert (y2 - math.sqrt(2) * y).abs().max().item() < 1e-12 * y.abs().max().item()


@pytest.mark.parametrize("chunk", [4, 64])
def test_causal_does_not_leak(chunk):
    m, _, _ = make_op("mha", "simpletron", d=D, causal=True, heads=4, kv_heads=2)
    m.chunk = chunk
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, None), n=29, d=D)


def test_shape_rule_refuses_dropout_and_positions():
    load_all()
    op = lookup("mha", "simpletron")
    assert op.causal == "yes" and op.supports == frozenset()
    with pytest.raises(ShapeProblem) as e:
        op.shape(op.params(dropout=0.1), OpEnv(in_shapes=(("b", "n", D),)))
    assert e.value.field == "dropout"
