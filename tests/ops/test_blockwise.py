"""mha(blockwise) against its defining equation, in float64: per head i, query block j attends key block
(j + s_i) mod B, blocks floor(t B / n), written here as a full n x n masked softmax with explicit sums; the shift
assignment is the paper's (identity first, then contiguous groups per shift); no causal form; left padding is
refused (right padding: test_padding.py)."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx, OpEnv, ShapeProblem, lookup
from evodsl.ops.attention.blockwise import head_shifts
from ophelpers import head_projections, make_op, output_projection, perturb_params

D = 32


def reference_blockwise(m, x, blocks, shifts):
    b, n, _ = x.shape
    h, g, dh = m.heads, m.kv_heads, m.head_dim
    q, k, v = head_projections(m, x)
    blk = torch.arange(n) * blocks // n  # floor(t B / n)
    present = torch.zeros(blocks, dtype=torch.bool)
    present[blk] = True
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for hh in range(h):
        target = (blk + shifts[hh]) % blocks
        target = torch.where(present[target], target, blk)  # an empty key block: the query's own block
        allowed = blk[None, :] == target[:, None]  # [query, key]
        kh = hh // (h // g)
        s = torch.einsum("bid,bjd->bij", q[:, :, hh], k[:, :, kh]) / math.sqrt(dh)
        s = s.masked_fill(~allowed, float("-inf"))
        w = torch.exp(s - s.amax(-1, keepdim=True))
        out[:, :, hh] = torch.einsum("bij,bjd->bid", w / w.sum(-1, keepdim=True), v[:, :, kh])
    return output_projection(m, out.reshape(b, n, h * dh))


def test_shift_assignment_is_the_papers():
    assert head_shifts(12, 2, 10) == [0] * 10 + [1, 1]  # 10:2
    assert head_shifts(12, 3, 8) == [0] * 8 + [1, 1, 2, 2]  # 8:2:2
    assert head_shifts(12, 3, None) == [0] * 4 + [1] * 4 + [2] * 4  # 4:4:4
    assert head_shifts(4, 2, 4) == [0] * 4  # every head on the identity: block-diagonal attention


@pytest.mark.parametrize("n,blocks,identity,kv_heads", [(64, 2, None, None), (64, 4, 1, 2), (77, 3, 2, None),
                                                        (50, 3, None, 1), (9, 4, 1, 2), (3, 4, None, None),
                                                        (40, 1, None, None)])
def test_blockwise_matches_equation(n, blocks, identity, kv_heads):
    m, _, _ = make_op("mha", "blockwise", d=D, heads=4, kv_heads=kv_heads, blocks=blocks, identity=identity)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    shifts = head_shifts(4, blocks, identity)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference_blockwise(m, x, blocks, shifts)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        if blocks > 1 and n >= blocks:  # the shifts are read: other shifts give other outputs
            other = reference_blockwise(m, x, blocks, [(s + 1) % blocks for s in shifts])
            assert (y - other).abs().max().item() > 1e-6


def test_left_padding_and_bad_assignments_are_refused():
    m, _, _ = make_op("mha", "blockwise", d=D, heads=4, blocks=2)
    x = torch.randn(2, 10, D, dtype=torch.float64)
    left = torch.ones(2, 10, dtype=torch.bool)
    left[0, :3] = False
    with pytest.raises(EvoError, match="E409.*right padding"):
        m(x, Ctx(mask=left))
    op = lookup("mha", "blockwise")
    env = OpEnv(in_shapes=(("b", "n", D),))
    with pytest.raises(ShapeProblem, match="identity=5 is more than heads=4"):
        op.shape(op.params(heads=4, identity=5), env)
    with pytest.raises(ShapeProblem, match="one block"):
        op.shape(op.params(heads=4, blocks=1, identity=2), env)


def test_blockwise_has_no_causal_form():
    src = ("d_model = 32\nmodel m(causal=true) = input(tokens, vocab=11) -> embed(token) -> mha(blockwise, blocks=2)"
           " -> head(lm)\n")
    with pytest.raises(EvoError, match="E301"):
        evodsl.parse(src)
