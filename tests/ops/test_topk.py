"""mha(topk) against its defining equation (1912.11637 eq. 6-7), in float64: per query and head, the k largest of the
scores q_i . k_j / sqrt(dh) (causal: among j <= i, all of them while there are fewer than k), one softmax over
those, written with loops and sorting, not the module's helpers. The chunked selection (chunks dividing n or not,
a chunk past n), grouped K/V heads, k past n; with k >= n it is softmax attention, with k < n it is not. Padding:
padded keys never selected; decoding equals the forward (also test_decode.py), no leak (also test_leaks.py)."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.decode import DecodeState
from evodsl.ops import Ctx, OpEnv, ShapeProblem, lookup
from ophelpers import assert_no_leak, head_projections, make_op, output_projection, perturb_params

D = 32


def reference(m, x, k_top, causal, mask=None):
    """The equation, query by query: the keys a query may read (causal: j <= i; not padded), their scores sorted,
    the k largest kept, softmax over them."""
    q, k, v = head_projections(m, x)
    b, n, h, dh = q.shape
    g = h // k.shape[2]
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        for hh in range(h):
            for i in range(n):
                keys = [j for j in range(n) if (not causal or j <= i) and (mask is None or mask[bb, j])]
                s = {j: float(q[bb, i, hh] @ k[bb, j, hh // g]) / math.sqrt(dh) for j in keys}
                top = sorted(keys, key=s.get, reverse=True)[:k_top]
                w = torch.tensor([s[j] for j in top], dtype=x.dtype).softmax(0)
                out[bb, i, hh] = w @ v[bb, top, hh // g]
    return output_projection(m, out.reshape(b, n, h * dh))


CASES = [  # n, k, chunk, kv_heads
    (17, 5, 4, None), (23, 3, 7, 2), (30, 8, 64, 1),  # chunks not dividing n; one chunk past n
    (12, 1, 5, 2),  # k = 1: the best key alone
    (9, 20, 4, None),  # k past n: every key (softmax)
    (4, 6, 2, 2),  # n smaller than k and a chunk of 2
]


def _op(n, k, chunk, kv_heads, causal):
    m, _, _ = make_op("mha", "topk", d=D, causal=causal, heads=4, kv_heads=kv_heads, k=k, chunk=chunk)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    return m, x


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("n, k, chunk, kv_heads", CASES)
def test_topk_matches_equation(n, k, chunk, kv_heads, causal):
    m, x = _op(n, k, chunk, kv_heads, causal)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference(m, x, k, causal)
    assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


def test_gradient_matches_the_dense_masked_form():
    """The gradient flows through the selected scores alone: the same as the dense form (scores below the k-th
    -inf, softmax) gives, for the input and every weight."""
    m, x = _op(13, 4, 5, 2, True)
    x = x.requires_grad_()
    y = m(x, Ctx())
    gx = torch.autograd.grad(y.square().sum(), [x, *m.parameters()])
    q, kk, v = head_projections(m, x)
    g = q.shape[2] // kk.shape[2]
    kk, v = kk.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bihd,bjhd->bhij", q, kk) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.ones(13, 13, dtype=torch.bool).triu(1), float("-inf"))
    kth = s.topk(4, -1).values[..., -1:]
    s = s.masked_fill(s < kth, float("-inf"))
    o = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v).reshape(2, 13, -1)
    gr = torch.autograd.grad(output_projection(m, o).square().sum(), [x, *m.parameters()])
    for a, b in zip(gx, gr):
        assert (a - b).abs().max().item() < 1e-10 * max(b.abs().max().item(), 1.0)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_k_past_n_is_softmax_and_fewer_differ(causal):
    """k >= n: every key kept, mha(softmax) (1e-12, outputs of order 1); k = 3 of 31 differs by more than 1e-3."""
    s, _, _ = make_op("mha", "softmax", d=D, causal=causal, heads=4, kv_heads=2)
    perturb_params(s)
    x = torch.randn(2, 31, D, dtype=torch.float64)
    with torch.no_grad():
        want = s(x, Ctx())
        assert want.abs().max().item() > 0.1
        for k, close in ((31, True), (3, False)):
            m, _, _ = make_op("mha", "topk", d=D, causal=causal, heads=4, kv_heads=2, k=k, chunk=8)
            m.load_state_dict(s.state_dict())
            err = (m(x, Ctx()) - want).abs().max().item()
            assert err < 1e-12 if close else err > 1e-3


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_padded_keys_are_never_selected(causal):
    """Left and right padding: each real query's output is the equation's over the real keys only."""
    m, x = _op(14, 3, 4, 2, causal)
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[0, 10:] = False  # right
    mask[1, :4] = False  # left
    with torch.no_grad():
        y, ref = m(x, Ctx(mask=mask)), reference(m, x, 3, causal, mask)
    assert torch.isfinite(y).all()
    assert (y - ref)[mask].abs().max().item() < 1e-10


def test_causal_does_not_leak():
    m, x = _op(30, 3, 4, 2, True)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=26, d=D)


def test_step_by_step_equals_forward():
    """The K/V cache: one token at a time and in chunks, each new query's top k over the cache and itself."""
    m, x = _op(19, 4, 3, 2, True)
    with torch.no_grad():
        want = m(x, Ctx())
        for cuts in ([1] * 19, [5, 1, 4, 3, 6], [2, 17]):
            ctx, outs, t = Ctx(cache=DecodeState()), [], 0
            for c in cuts:
                ctx.offset = t
                outs.append(m(x[:, t:t + c], ctx))
                t += c
            assert (torch.cat(outs, 1) - want).abs().max().item() < 1e-12


def test_refusals():
    op = lookup("mha", "topk")
    with pytest.raises(ShapeProblem, match="dropout"):
        op.shape(op.params(heads=4, dropout=0.1), OpEnv(in_shapes=(("b", "n", D),)))
    src = "d_model = 32\nmodel m = input(tokens, vocab=11) -> embed(token) -> mha(topk, k=4) -> head(lm)\n"
    evodsl.parse(src)
    for bad in ("k=0", "chunk=0"):
        with pytest.raises(EvoError, match=f"E204.*{bad[:-2]}"):
            evodsl.parse(src.replace("k=4", bad))
    with pytest.raises(EvoError, match="alibi"):
        evodsl.parse(src.replace("embed(token)", "embed(token) -> pos(alibi)"))
