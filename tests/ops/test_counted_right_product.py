"""mha(fanet) and mha(simpletron), right-product attention scaled by the count of keys read, against their
defining equations in float64, computed here the other way round: from the n x n scores (an explicit loop over
queries), per head
    fanet:      o_i = 1/|J_i| sum_{j in J_i} (q_i . k_j / (||q_i|| ||k_j||)) v_j   (l2 norms written out here)
    simpletron: o_i = |J_i|^(-1/2) sum_{j in J_i} (q_i . k_j) v_j
J_i the real keys (causal: j <= i); padding counts each sequence's own keys; the chunked causal form across
chunk sizes."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl.ops import Ctx, OpEnv, ShapeProblem, load_all, lookup
from ophelpers import assert_no_leak, head_projections, make_op, output_projection, perturb_params

D = 32


def _unit(t):
    return t / torch.sqrt((t ** 2).sum(-1, keepdim=True))


# variant -> (the scores from q_i, k_j of one head, the scale from the count of keys read)
FORMS = {"fanet": (lambda q, k: torch.einsum("bic,bjc->bij", _unit(q), _unit(k)), lambda c: 1 / c),
         "simpletron": (lambda q, k: torch.einsum("bic,bjc->bij", q, k), lambda c: 1 / torch.sqrt(c))}
VARIANTS = sorted(FORMS)


def reference(variant, m, x, causal, mask=None):
    scores_of, scale_of = FORMS[variant]
    b, n, _ = x.shape
    h, g, dh = m.heads, m.kv_heads, m.head_dim
    q, k, v = head_projections(m, x)
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    real = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    for hh in range(h):
        qh, kh, vh = q[:, :, hh], k[:, :, hh // (h // g)], v[:, :, hh // (h // g)]
        scores = scores_of(qh, kh)  # n x n, here only
        for i in range(n):
            keep = real.clone()
            if causal:
                keep[:, i + 1:] = False
            count = keep.sum(-1, keepdim=True).clamp(min=1).to(x.dtype)
            out[:, i, hh] = torch.einsum("bj,bje->be", scores[:, i] * keep, vh) * scale_of(count)
    return output_projection(m, out.reshape(b, n, h * dh))


CASES = [  # (n, chunk, heads, kv_heads)
    (40, 64, 4, None),  # one chunk
    (29, 8, 4, 2),  # many chunks and a remainder, grouped K/V heads
    (37, 8, 4, 1),  # multi-query
    (64, 16, 2, None),  # n a multiple of the chunk
    (17, 4, 4, 4),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("n,chunk,heads,kv_heads", CASES)
def test_matches_equation(variant, causal, n, chunk, heads, kv_heads):
    m, _, _ = make_op("mha", variant, d=D, causal=causal, heads=heads, kv_heads=kv_heads)
    m.chunk = chunk
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference(variant, m, x, causal)
    assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
def test_padding_counts_the_real_keys(variant, causal, left):
    """The count is of each sequence's real tokens: the reference with the mask, position by position (the
    padded positions' outputs included, but for a right-padded causal batch, which skips the mask: its padded
    rows read padding, as no real row does; under left padding causal padded rows read no key, 0 before o_proj)."""
    m, _, _ = make_op("mha", variant, d=D, causal=causal, heads=4, kv_heads=2)
    m.chunk = 8
    perturb_params(m)
    x = torch.randn(3, 21, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mask = torch.arange(21)[None, :] < torch.tensor([[21], [13], [5]])
    if left:
        mask = mask.flip(1)
    with torch.no_grad():
        y, ref = m(x, Ctx(mask=mask)), reference(variant, m, x, causal, mask)
    rows = mask if causal and not left else torch.ones_like(mask)
    assert (y - ref)[rows].abs().max().item() < 1e-10 * ref.abs().max().item()


def test_fanet_is_a_mean_not_a_sum():
    """Doubling the sequence by repeating it leaves the bidirectional output unchanged (a mean over keys), and
    the causal output at the last position equals the bidirectional one."""
    m, _, _ = make_op("mha", "fanet", d=D, heads=4)
    mc, _, _ = make_op("mha", "fanet", d=D, heads=4, causal=True)
    perturb_params(m)
    mc.load_state_dict(m.state_dict())
    x = torch.randn(1, 10, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        y, y2 = m(x, Ctx()), m(torch.cat([x, x], 1), Ctx())
        assert (y2[:, :10] - y).abs().max().item() < 1e-12
        assert (mc(x, Ctx())[:, -1] - y[:, -1]).abs().max().item() < 1e-12


def test_simpletron_scale_is_one_over_sqrt_n():
    """Repeating the sequence twice doubles K^T V and multiplies the scale by 1/sqrt(2): the output grows by
    sqrt(2) (before o_proj's bias)."""
    m, _, _ = make_op("mha", "simpletron", d=D, heads=4)
    perturb_params(m)
    x = torch.randn(1, 10, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx()) - m.o_proj.bias
        y2 = m(torch.cat([x, x], 1), Ctx())[:, :10] - m.o_proj.bias
    assert (y2 - math.sqrt(2) * y).abs().max().item() < 1e-12 * y.abs().max().item()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunk", [4, 64])
def test_causal_does_not_leak(variant, chunk):
    m, _, _ = make_op("mha", variant, d=D, causal=True, heads=4, kv_heads=2)
    m.chunk = chunk
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, None), n=29, d=D)


@pytest.mark.parametrize("variant", VARIANTS)
def test_shape_rule_refuses_dropout_and_positions(variant):
    load_all()
    op = lookup("mha", variant)
    assert op.causal == "yes" and op.supports == frozenset()
    with pytest.raises(ShapeProblem) as e:
        op.shape(op.params(dropout=0.1), OpEnv(in_shapes=(("b", "n", D),)))
    assert e.value.field == "dropout"
