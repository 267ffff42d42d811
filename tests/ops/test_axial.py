"""pos(axial): Reformer's axial position embeddings against HF's layout, written here in float64: the tables
[n1, 1, d1] and [1, n2, d2] broadcast to the [n1, n2] grid, concatenated along features, flattened row-major and
read at t < n; training dropout as HF's dropout2d over the grid's columns (the same draws); decoding in pieces,
causality, and the refusals (a split that does not add up to d, a sequence past the grid)."""
from __future__ import annotations

import pytest
import torch

import evodsl
from evodsl import EvoError
from ophelpers import assert_no_leak, decode_in_pieces, make_op, perturb_params


def ref_axial(row: torch.Tensor, col: torch.Tensor, n: int, start: int = 0) -> torch.Tensor:
    """HF AxialPositionEmbeddings (eval): weights [n1, 1, d1], [1, n2, d2] expanded to [n1, n2, .], concatenated,
    reshaped to [n1 n2, d], positions start..start+n-1."""
    n1, n2 = row.shape[0], col.shape[0]
    grid = torch.cat([row[:, None, :].expand(n1, n2, -1), col[None, :, :].expand(n1, n2, -1)], dim=-1)
    return grid.reshape(n1 * n2, -1)[start:start + n]


def _randn(*shape, seed=3):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("n1,n2,d1,d2,n", [
    (4, 8, 8, 24, 32),   # the whole grid
    (5, 7, 20, 12, 23),  # n not a multiple of n2, the last row partly read
    (3, 16, 1, 31, 5),   # n shorter than one grid row
    (8, 1, 16, 16, 6),   # a single column: E2's one row everywhere
])
def test_equals_hf_layout(n1, n2, d1, d2, n):
    m, _, _ = make_op("pos", "axial", d=d1 + d2, n1=n1, n2=n2, d1=d1, d2=d2)
    perturb_params(m)
    x = _randn(2, n, d1 + d2)
    assert tuple(m.row.shape) == (n1, 1, d1) and tuple(m.col.shape) == (1, n2, d2)  # HF's weights' shapes
    want = x + ref_axial(m.row.detach()[:, 0], m.col.detach()[0], n)
    assert (m(x) - want).abs().max().item() <= 1e-12
    # one scalar at a time: position t reads E1[t // n2] and E2[t % n2]
    t = n - 1
    assert (m(x)[0, t] - x[0, t] - torch.cat([m.row[t // n2, 0], m.col[0, t % n2]])).abs().max().item() <= 1e-12


def test_training_dropout_is_hf_dropout2d_over_grid_columns():
    """HF: dropout2d(grid.transpose(2, 1)) on [b, n2, n1, d], i.e. one draw per (batch row, column j), scaled by
    1/(1 - p). The module draws its [b, n2] keep mask with torch.rand; the reference draws the same numbers."""
    n1, n2, d1, d2, p, b, n = 4, 6, 10, 6, 0.3, 3, 22
    m, _, _ = make_op("pos", "axial", d=d1 + d2, n1=n1, n2=n2, d1=d1, d2=d2, dropout=p)
    perturb_params(m)
    m.train()
    x = _randn(b, n, d1 + d2)
    torch.manual_seed(11)
    got = m(x)
    torch.manual_seed(11)
    keep = (torch.rand(b, n2) >= p).to(torch.float64) / (1 - p)  # [b, n2]: the channels of dropout2d
    enc = ref_axial(m.row.detach()[:, 0], m.col.detach()[0], n)
    want = x.clone()
    for i in range(b):
        for t in range(n):
            want[i, t] += enc[t] * keep[i, t % n2]
    assert (got - want).abs().max().item() <= 1e-12
    assert 0 < int((keep == 0).sum()) < b * n2  # some columns dropped, not all: the test sees both
    m.eval()
    assert torch.equal(m(x), x + enc)  # eval: no dropout


def test_decoding_in_pieces_and_no_leak():
    m, _, _ = make_op("pos", "axial", d=32, n1=5, n2=7, d1=12, d2=20)
    perturb_params(m)
    x = _randn(2, 33, 32)
    full = m(x)
    got, _ = decode_in_pieces(m, x, [4, 1, 9, 2, 17])
    assert (got - full).abs().max().item() <= 1e-12
    assert_no_leak(lambda z: m(z), n=20)


def test_a_model_with_axial_positions_decodes():
    spec = """d_model = 32
heads = 4
model lm(causal=true) = input(tokens, vocab=40) -> embed(token) -> pos(axial, n1=4, n2=8, d1=8, d2=24)
    -> repeat(norm -> mha -> norm -> ffn, 2) -> norm -> head(lm)
"""
    model = evodsl.compile(spec, dtype=torch.float64)
    ids = torch.randint(0, 40, (2, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        state, pieces = None, []
        for a, z in ((0, 7), (7, 8), (8, 29)):
            logits, state = model.decode(ids[:, a:z], state)
            pieces.append(logits)
    assert (torch.cat(pieces, 1) - full).abs().max().item() <= 1e-10 * full.abs().max().item()
    assert evodsl.cost(spec)["params"] == sum(p.numel() for p in model.parameters())
    assert model.pos.row.numel() + model.pos.col.numel() == 4 * 8 + 8 * 24


def test_refusals():
    with pytest.raises(EvoError) as e:
        evodsl.parse("d_model = 32\nx = pos(axial, n1=4, n2=8, d1=8, d2=16)")
    text = str(e.value)
    assert "error[E300]: pos(axial): d1 + d2 = 24, but the stream is 32 wide" in text
    assert "help: split the width: d1 + d2 = 32" in text and "^^" in text
    with pytest.raises(EvoError) as e:
        evodsl.parse("d_model = 32\nx = pos(axial, n1=0, n2=8, d1=8, d2=24)")
    assert "E204" in str(e.value) and "n1" in str(e.value)
    m, _, _ = make_op("pos", "axial", d=32, n1=2, n2=3, d1=8, d2=24)
    with pytest.raises(RuntimeError, match="longer than pos\\(axial\\)'s n1 \\* n2"):
        m(_randn(1, 7, 32))
