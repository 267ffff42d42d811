"""mha(probsparse) against Informer's ProbSparse self-attention (2012.07436 eq. 4 and sec. 3.1), in float64, written
with loops: each query's sparsity measurement M = max - mean of its scores on its U sampled keys (the sample shared
with the module: sample_index, a seeded hash), the u queries of largest M attend with softmax over every key, the rest
output the mean of V; u = U = min(c ceil(ln n), n). Grouped K/V heads, n = 1 (no active query), u = n (softmax
attention), right padding (each row its own length), the refusals."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx, OpEnv, ShapeProblem, lookup
from evodsl.ops.attention.probsparse import sample_index
from ophelpers import head_projections, make_op, output_projection, perturb_params

D = 32


def reference(m, x, c, seed=0):
    """The paper's rule, row by row, head by head; returns (output, {(b, h): set of active queries})."""
    q, k, v = head_projections(m, x)
    b, n, h, dh = q.shape
    g = h // k.shape[2]
    u = min(c * math.ceil(math.log(n)), n)
    sample = sample_index(n, u, seed, n, "cpu")
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    active = {}
    for bb in range(b):
        for hh in range(h):
            kk, vv = k[bb, :, hh // g], v[bb, :, hh // g]
            M = []
            for i in range(n):
                s = [float(q[bb, i, hh] @ kk[int(j)]) / math.sqrt(dh) for j in sample[i]]
                M.append(max(s) - sum(s) / u if s else 0.0)
            top = set(sorted(range(n), key=lambda i: M[i], reverse=True)[:u])
            active[bb, hh] = top
            for i in range(n):
                if i in top:
                    w = (kk @ q[bb, i, hh] / math.sqrt(dh)).softmax(0)
                    out[bb, i, hh] = w @ vv
                else:
                    out[bb, i, hh] = vv.mean(0)
    return output_projection(m, out.reshape(b, n, h * dh)), active


CASES = [(30, 2, None), (23, 1, 2), (41, 3, 1), (9, 1, 4), (1, 5, 2)]  # n, factor, kv_heads (n = 1: u = 0)


def _op(n, factor, kv_heads, **kw):
    m, _, _ = make_op("mha", "probsparse", d=D, heads=4, kv_heads=kv_heads, factor=factor, **kw)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    return m, x


@pytest.mark.parametrize("n, factor, kv_heads", CASES)
def test_probsparse_matches_equation(n, factor, kv_heads):
    m, x = _op(n, factor, kv_heads)
    with torch.no_grad():
        y = m(x, Ctx())
        ref, active = reference(m, x, factor)
    assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
    if n > 1:  # the measure picks a real subset: some rows differ from the mean of V, others do not
        assert all(len(a) == min(factor * math.ceil(math.log(n)), n) for a in active.values())


def test_sample_is_seeded_uniform_and_in_range():
    """The hash sample: in [0, L), deterministic, another seed another sample, every key drawn about equally."""
    a = sample_index(200, 50, 0, 200, "cpu")
    assert a.min() >= 0 and a.max() < 200 and torch.equal(a, sample_index(200, 50, 0, 200, "cpu"))
    assert not torch.equal(a, sample_index(200, 50, 1, 200, "cpu"))
    counts = torch.bincount(a.flatten(), minlength=200).double()
    assert counts.std() / counts.mean() < 0.2  # 50 draws a key on average: Poisson's 0.14


def test_u_equal_to_n_is_softmax_and_fewer_differ():
    """c ceil(ln n) >= n: every query active, mha(softmax) (1e-12); c = 1 (u = 4 of 31) differs by more than 1e-3."""
    s, _, _ = make_op("mha", "softmax", d=D, heads=4, kv_heads=2)
    perturb_params(s)
    x = torch.randn(2, 31, D, dtype=torch.float64)
    with torch.no_grad():
        want = s(x, Ctx())
        for factor, close in ((8, True), (1, False)):
            m, _, _ = make_op("mha", "probsparse", d=D, heads=4, kv_heads=2, factor=factor)
            m.load_state_dict(s.state_dict())
            err = (m(x, Ctx()) - want).abs().max().item()
            assert err < 1e-12 if close else err > 1e-3


def test_right_padding_is_each_sequence_alone():
    m, x = _op(30, 2, 2)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 17:] = False
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        assert torch.isfinite(y).all()
        assert (y[0] - m(x[:1], Ctx())[0]).abs().max().item() < 1e-12
        assert (y[1, :17] - m(x[1:, :17], Ctx())[0]).abs().max().item() < 1e-12


def test_refusals():
    op = lookup("mha", "probsparse")
    env = OpEnv(in_shapes=(("b", "n", D),))
    with pytest.raises(ShapeProblem, match="no causal form") as err:
        op.shape(op.params(heads=4), OpEnv(in_shapes=(("b", "n", D),), causal=True))
    assert "causal=false" in err.value.hint
    with pytest.raises(ShapeProblem, match="dropout"):
        op.shape(op.params(heads=4, dropout=0.1), env)
    assert op.decode_form(op.params()) is None  # no step form: generate refuses it
    src = "d_model = 32\nmodel m(causal=false) = input(tokens, vocab=11) -> embed(token) -> mha(probsparse, factor=2) -> head(lm)\n"
    evodsl.parse(src)
    with pytest.raises(EvoError, match="no causal form"):
        evodsl.parse(src.replace("causal=false", "causal=true"))
    with pytest.raises(EvoError, match="E204.*factor"):
        evodsl.parse(src.replace("factor=2", "factor=0"))
    m, x = _op(10, 2, None, max_len=8)
    with pytest.raises(EvoError, match="E410.*max_len=8"):
        m(x, Ctx())
    m, x = _op(10, 2, None)
    left = torch.ones(2, 10, dtype=torch.bool)
    left[1, :3] = False
    with pytest.raises(EvoError, match="E409.*right padding"):
        m(x, Ctx(mask=left))
