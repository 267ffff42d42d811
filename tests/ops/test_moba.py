"""mha(moba) against its defining equation, in float64. The selection, written from the paper's rule with loops: query
i's own block floor(i / B), and the k - 1 past blocks c < floor(i / B) with the largest q_i . mean(K_c) (every past
block while there are fewer); the attention: one softmax of q_i . k_j / sqrt(dh) over the keys j <= i of those
blocks. One test checks the module's selection against the rule's, another the attention given the rule's selection;
with k covering every block MoBA is causal softmax attention. Decoding equals the forward (test_decode.py), the
forward does not leak (test_leaks.py), right padding (test_padding.py)."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx, OpEnv, ShapeProblem, lookup
from ophelpers import assert_no_leak, decode_in_pieces, head_projections, make_op, output_projection, perturb_params

D = 32


def chosen(q, k, B, topk):
    """The rule's selection: {(b, i, h): set of blocks}, from q [b, n, h, dh], k [b, n, kv, dh]."""
    b, n, h, dh = q.shape
    g = h // k.shape[2]
    out = {}
    for bb in range(b):
        for hh in range(h):
            for i in range(n):
                own = i // B
                score = {c: float(q[bb, i, hh] @ k[bb, c * B:(c + 1) * B, hh // g].mean(0)) for c in range(own)}
                best = sorted(score, key=score.get, reverse=True)[:topk - 1]
                out[bb, i, hh] = {own, *best}
    return out


def reference(m, x, B, topk, sel=None):
    q, k, v = head_projections(m, x)
    b, n, h, dh = q.shape
    g = h // k.shape[2]
    sel = sel or chosen(q, k, B, topk)
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for (bb, i, hh), blocks in sel.items():
        keys = [j for c in sorted(blocks) for j in range(c * B, min((c + 1) * B, i + 1))]
        s = torch.stack([q[bb, i, hh] @ k[bb, j, hh // g] for j in keys]) / math.sqrt(dh)
        out[bb, i, hh] = s.softmax(0) @ v[bb, keys, hh // g]
    return output_projection(m, out.reshape(b, n, h * dh))


CASES = [  # n, block, topk, kv_heads
    (17, 3, 2, None), (23, 4, 3, 2), (30, 5, 2, 1), (13, 2, 4, 2),
    (5, 8, 2, None),  # n < B: one block, the own block alone (causal softmax)
    (12, 3, 1, None),  # k = 1: the own block alone (local blocks)
    (20, 3, 40, 2),  # k past the blocks: every past block
]


def _op(n, block, topk, kv_heads):
    m, _, _ = make_op("mha", "moba", d=D, causal=True, heads=4, kv_heads=kv_heads, block=block, topk=topk)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    return m, x


@pytest.mark.parametrize("n, block, topk, kv_heads", CASES)
def test_selection_follows_the_rule(n, block, topk, kv_heads):
    """The module's chosen blocks (those it reads: own and past ones) equal the rule's, query by query and head by
    head."""
    m, x = _op(n, block, topk, kv_heads)
    with torch.no_grad():
        q, k, _ = m.qkv(x)
        C = -(-n // block) + topk  # the blocks and k padding blocks
        sel = m.select(q, m.means(torch.nn.functional.pad(k, (0, 0, 0, C * block - n))), 0)
        want = chosen(*(t.transpose(1, 2) for t in (q, k)), block, topk)
    for (bb, i, hh), blocks in want.items():
        got = {int(c) for c in sel[bb, hh, i] if int(c) <= i // block}
        assert got == blocks, (bb, i, hh, got, blocks)


@pytest.mark.parametrize("n, block, topk, kv_heads", CASES)
def test_moba_matches_equation(n, block, topk, kv_heads):
    m, x = _op(n, block, topk, kv_heads)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference(m, x, block, topk)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


def test_every_block_chosen_is_causal_softmax_and_fewer_differ():
    """k >= the number of blocks: each query reads all its past, so MoBA is mha(softmax) (1e-12, outputs of order 1);
    with k = 2 of 8 blocks it differs by more than 1e-3."""
    s, _, _ = make_op("mha", "softmax", d=D, causal=True, heads=4, kv_heads=2)
    perturb_params(s)
    x = torch.randn(2, 31, D, dtype=torch.float64)
    with torch.no_grad():
        want = s(x, Ctx())
        assert want.abs().max().item() > 0.1
        for topk, close in ((8, True), (2, False)):
            m, _, _ = make_op("mha", "moba", d=D, causal=True, heads=4, kv_heads=2, block=4, topk=topk)
            m.load_state_dict(s.state_dict())
            err = (m(x, Ctx()) - want).abs().max().item()
            assert err < 1e-12 if close else err > 1e-3


def test_causal_does_not_leak():
    m, x = _op(30, 3, 2, 2)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=26, d=D)


def test_step_by_step_equals_forward():
    """The cache (keys, values and the finished blocks' mean keys): one token at a time and in chunks."""
    m, x = _op(19, 3, 2, 2)
    with torch.no_grad():
        want = m(x, Ctx())
        for cuts in ([1] * 19, [5, 1, 4, 3, 6], [2, 17]):
            assert (decode_in_pieces(m, x, cuts)[0] - want).abs().max().item() < 1e-12


def test_refusals():
    op = lookup("mha", "moba")
    with pytest.raises(ShapeProblem, match="causal only") as err:
        op.shape(op.params(heads=4), OpEnv(in_shapes=(("b", "n", D),)))
    assert "causal=true" in err.value.hint
    with pytest.raises(ShapeProblem, match="drop out"):
        op.shape(op.params(heads=4, dropout=0.1), OpEnv(in_shapes=(("b", "n", D),), causal=True))
    src = "d_model = 32\nmodel m(causal=false) = input(tokens, vocab=11) -> embed(token) -> mha(moba, block=4) -> head(lm)\n"
    with pytest.raises(EvoError, match="causal only"):
        evodsl.parse(src)
    with pytest.raises(EvoError, match="E204.*block"):
        evodsl.parse(src.replace("block=4", "block=0").replace("causal=false", "causal=true"))
    m, x = _op(10, 3, 2, None)
    left = torch.ones(2, 10, dtype=torch.bool)
    left[1, :3] = False
    with pytest.raises(EvoError, match="E409.*right padding"):
        m(x, Ctx(mask=left))
