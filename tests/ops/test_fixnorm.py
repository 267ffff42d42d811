"""norm(fixnorm) against FixNorm's equation on word embeddings, in float64: every looked-up embedding has length g
(one learned scalar), i.e. the table's rows normalised to g then looked up; scalenorm's declaration, not a copy."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl.diagnostics import EvoError
from evodsl.ops import load_all, lookup
from ophelpers import make_op, perturb_params

TOP = "d_model = 16\nheads = 2\nvocab = 13\n"


def test_fixnorm_is_scalenorms_declaration():
    load_all()
    a, b = lookup("norm", "fixnorm"), lookup("norm", "scalenorm")
    assert (a.params, a.module, a.cost) == (b.params, b.module, b.cost) and "1910.05895" in a.paper


@pytest.mark.parametrize("d,shape", [(16, (2, 5)), (7, (1, 1)), (32, (3, 4))])
def test_fixnorm_matches_equation(d, shape):
    m, p, _ = make_op("norm", "fixnorm", d=d)
    assert m.scale.item() == pytest.approx(math.sqrt(d), rel=1e-7)
    perturb_params(m)
    g = m.scale.item()
    x = torch.randn((*shape, d), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = torch.empty_like(x)
    for i in range(shape[0]):
        for t in range(shape[1]):
            ref[i, t] = g * x[i, t] / math.sqrt(sum(float(v) ** 2 for v in x[i, t]))
    torch.testing.assert_close(m(x), ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(m(x).norm(dim=-1), torch.full(shape, abs(g), dtype=torch.float64), rtol=1e-12)


def test_fixnorm_on_the_embedding_table():
    """embed(token) -> norm(fixnorm) equals a lookup into the table whose rows are normalised to length g."""
    src = TOP + "model m = input(tokens, vocab=vocab) -> embed(token) -> norm(fixnorm) -> head(linear, d_out=3)\n"
    m = evodsl.compile(src).double()
    perturb_params(m)
    table, g = m.embed.weight.detach(), m.norm.scale.item()
    rows = torch.stack([g * w / math.sqrt(sum(float(v) ** 2 for v in w)) for w in table])
    ids = torch.randint(0, 13, (2, 6), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m.norm(m.embed(ids, None), None), rows[ids], rtol=1e-12, atol=1e-12)


def test_fixnorm_errors():
    with pytest.raises(EvoError, match=r"eps"):
        evodsl.parse(TOP + "model m = input(tokens, vocab=vocab) -> embed(token) -> norm(fixnorm, eps=2) -> mha\n")
