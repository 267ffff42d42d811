"""mha(bigbird) against its defining equation in float64: a dense [nb, nb] block mask per head built from the
window, the global blocks and the seeded random blocks (the op's own draw, shared so that the comparison is
exact), expanded to positions, one softmax per query by explicit einsums. The random draw itself (distinct
blocks outside the window and the globals, fixed by the seed), padding, GQA, and what the op refuses."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl.ops import Ctx, OpEnv, ShapeProblem, lookup
from evodsl.ops.attention.bigbird import random_blocks
from ophelpers import assert_every_parameter_learns, head_projections, make_op, output_projection, perturb_params

D = 32


def block_mask(m, nb: int) -> torch.Tensor:
    """bool [h, nb, nb]: which key blocks each query block reads, per head, written from the definition."""
    h, first, last, half = m.heads, m.first, m.last, m.window // 2
    glob = set(range(min(first, nb))) | set(range(max(nb - last, 0), nb))
    rnd, ok = m.random_blocks(nb, "cpu") if nb > first + last else (None, None)
    mask = torch.zeros(h, nb, nb, dtype=torch.bool)
    for hh in range(h):
        for i in range(nb):
            if i in glob:
                mask[hh, i] = True
                continue
            keys = {j for j in range(i - half, i + half + 1) if 0 <= j < nb} | glob
            keys |= {int(j) for j, o in zip(rnd[hh, i - first], ok[hh, i - first]) if o}
            mask[hh, i, sorted(keys)] = True
    return mask


def reference_bigbird(m, x, mask=None):
    """[b, n, d_model] from the dense block mask; padded query rows are left at o_proj(0) (not compared)."""
    b, n, _ = x.shape
    h, kv, dh, B = m.heads, m.kv_heads, m.head_dim, m.block
    nb = -(-n // B)
    q, k, v = head_projections(m, x)
    k, v = (t.repeat_interleave(h // kv, dim=2) for t in (k, v))
    allowed = block_mask(m, nb).repeat_interleave(B, 1).repeat_interleave(B, 2)[:, :n, :n]  # [h, n, n]
    keep = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    allowed = allowed[None] & keep[:, None, None, :]  # [b, h, n, n]
    s = torch.einsum("bthd,brhd->bhtr", q, k) / math.sqrt(dh)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    o = torch.einsum("bhtr,brhd->bthd", p.nan_to_num(0.0), v) * keep[:, :, None, None]
    return output_projection(m, o.reshape(b, n, h * dh))


CASES = [  # block, window, globals, random, n, kv_heads
    (4, 3, 2, 3, 64, None),  # HF's layout, 16 blocks
    (4, 3, 2, 2, 61, 2),  # GQA; the last block padded
    (3, 5, 1, 2, 47, None),  # a wider window, one global block (the first)
    (5, 1, 3, 4, 73, 1),  # window of the query block alone; two first and one last global; MQA
    (4, 3, 2, 3, 28, None),  # 7 blocks: fewer candidates than r for most rows
    (8, 3, 2, 3, 13, 2),  # two blocks, both global: full attention
    (2, 3, 0, 2, 33, None),  # no global blocks
]


@pytest.mark.parametrize("block,window,g,r,n,kv_heads", CASES)
def test_bigbird_matches_equation(block, window, g, r, n, kv_heads):
    m, _, _ = make_op("mha", "bigbird", d=D, heads=4, kv_heads=kv_heads, block=block, window=window, globals=g,
                      random=r)
    m.seed = n  # the op's seed= (make_op's own seed= is torch's)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference_bigbird(m, x)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        nb = -(-n // block)
        if nb > g + window + r:  # the control: another seed draws other blocks, which the comparison sees
            m.seed = n + 1
            assert (m(x, Ctx()) - y).abs().max().item() > 1e-6


def test_random_blocks_are_distinct_outside_window_and_globals():
    """Each (head, query block) draws min(r, m) distinct blocks among the m outside its window and the global
    blocks; the same seed gives the same draw, another seed another; every candidate gets drawn somewhere."""
    nb, h, r, w, first, last = 40, 8, 3, 3, 1, 1
    blocks, valid = random_blocks(nb, h, r, w, first, last, seed=7, device="cpu")
    assert blocks.shape == valid.shape == (h, nb - 2, r)
    seen = set()
    for hh in range(h):
        for row in range(nb - 2):
            i = row + first
            drawn = [int(j) for j, o in zip(blocks[hh, row], valid[hh, row]) if o]
            outside = [j for j in range(first, nb - last) if abs(j - i) > w // 2]
            assert len(drawn) == min(r, len(outside)) and len(set(drawn)) == len(drawn)
            assert set(drawn) <= set(outside)
            seen |= set(drawn)
    assert seen == set(range(first, nb - last))
    again, _ = random_blocks(nb, h, r, w, first, last, seed=7, device="cpu")
    other, _ = random_blocks(nb, h, r, w, first, last, seed=8, device="cpu")
    assert torch.equal(again, blocks) and not torch.equal(other, blocks)
    assert not torch.equal(blocks[0], blocks[1])  # each head its own draw
    _, ok = random_blocks(6, 2, 3, 3, 1, 1, seed=0, device="cpu")  # local blocks 1..4 less each window
    assert ok.sum(-1).tolist() == [[2, 1, 1, 2], [2, 1, 1, 2]]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_keys_take_no_part(side):
    """A padded batch against the reference with the padded keys out of every key set; every row finite."""
    n = 50
    m, _, _ = make_op("mha", "bigbird", d=D, heads=4, kv_heads=2, block=4, window=3, globals=2, random=2)
    perturb_params(m)
    x = torch.randn(3, n, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = torch.arange(n)[None, :] < torch.tensor([n, 31, 3])[:, None]
    mask = mask.flip(1) if side == "left" else mask
    with torch.no_grad():
        y, ref = m(x, Ctx(mask=mask)), reference_bigbird(m, x, mask)
    assert torch.isfinite(y).all()
    assert (y - ref)[mask].abs().max().item() < 1e-10 * ref.abs().max().item()


def test_gradients_reach_every_projection():
    m, _, _ = make_op("mha", "bigbird", d=D, heads=4, block=4, random=2, dropout=0.1)
    perturb_params(m)
    assert_every_parameter_learns(m, d=D)


def test_refusals():
    op = lookup("mha", "bigbird")
    env = OpEnv(in_shapes=(("b", "n", D),))
    with pytest.raises(ShapeProblem, match="window=4 is even"):
        op.shape(op.params(window=4, heads=4), env)
    assert op.causal == "no" and op.decode is None
