"""mha(hierarchical) against its defining equation, in float64, written pair by pair: (t, s) is read at the lowest
level l whose blocks of Nr 2^l tokens hold t and s at most one apart (causal: s's block the same as t's, s <= t, or
the one before), with the weight exp(q~_l(t) . k~_l(s) / sqrt(dh)), q~_l and k~_l the means over the 2^l-token
clusters (aligned at multiples of 2^l, the real tokens of each; causal: q~_l(t) the query of the cluster's first
token), o_t = sum_s w_ts v_s / sum_s w_ts. That is the H-matrix sum of the paper (tri-diagonal level 0, the coarse
levels' off-diagonal blocks less what the level below holds). Softmax attention where it must be: n <= 2 Nr, and
inputs constant over the coarsest clusters. Right padding equals the sequence alone (test_padding.py), left is
refused; decoding equals the forward (test_decode.py), the causal form does not leak (test_leaks.py)."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_no_leak, head_projections, make_op, output_projection, perturb_params

D = 32


def level_of(t: int, s: int, Nr: int, causal: bool) -> int:
    """The lowest level whose blocks hold t and s at most one apart (causal: s's block at or one before t's)."""
    l = 0
    while True:
        a, c = t // (Nr << l), s // (Nr << l)
        if (0 <= a - c <= 1) if causal else abs(a - c) <= 1:
            return l
        l += 1


def reference(m, x, Nr, causal, mask=None):
    q, k, v = head_projections(m, x)  # [b, n, h, dh], [b, n, kv, dh]
    b, n, h, dh = q.shape
    g = h // k.shape[2]
    real = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)

    def mean(t, bb, u, l):  # the mean of t over u's level-l cluster, its real tokens
        lo = (u >> l) << l
        idx = [i for i in range(lo, min(n, lo + (1 << l))) if real[bb, i]]
        return t[bb, idx].mean(0)

    for bb in range(b):
        for t in range(n):
            ws, vs = [], []
            if not real[bb, t]:
                continue
            for s in range(n):
                if not real[bb, s] or (causal and s > t):
                    continue
                l = level_of(t, s, Nr, causal)
                qt = q[bb, (t >> l) << l] if causal else mean(q, bb, t, l)
                ks = mean(k, bb, s, l)
                ws.append(torch.stack([qt[hh] @ ks[hh // g] for hh in range(h)]) / math.sqrt(dh))
                vs.append(v[bb, s])
            w = torch.stack(ws).softmax(0)  # [keys, h]
            out[bb, t] = torch.stack([w[:, hh] @ torch.stack(vs)[:, hh // g] for hh in range(h)])
    return output_projection(m, out.reshape(b, n, h * dh))


CASES = [  # causal, Nr, n, kv_heads
    (False, 4, 16, None), (True, 4, 16, None),  # n = Nr 2^2: three levels, the paper's layout
    (False, 4, 37, 2), (True, 4, 37, 2),  # n a multiple of no block or cluster, grouped K/V heads
    (False, 2, 29, 1), (True, 2, 29, 1),  # Nr = 2: five levels
    (True, 6, 50, None), (False, 6, 50, 2),  # Nr = 6: halves of 3
    (False, 8, 5, None), (True, 8, 5, 2),  # n < Nr: one block, softmax attention
]


@pytest.mark.parametrize("causal, Nr, n, kv_heads", CASES)
def test_hierarchical_matches_equation(causal, Nr, n, kv_heads):
    m, _, _ = make_op("mha", "hierarchical", d=D, causal=causal, heads=4, kv_heads=kv_heads, block=Nr)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference(m, x, Nr, causal)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        if n > 2 * Nr:  # the coarse levels are seen: not softmax attention
            s, _, _ = make_op("mha", "softmax", d=D, causal=causal, heads=4, kv_heads=kv_heads)
            s.load_state_dict(m.state_dict())
            assert (y - s(x, Ctx())).abs().max().item() > 1e-6


def test_right_padding_matches_equation_over_the_tokens():
    m, _, _ = make_op("mha", "hierarchical", d=D, heads=4, kv_heads=2, block=4)
    perturb_params(m)
    x = torch.randn(2, 27, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mask = torch.arange(27)[None, :] < torch.tensor([[27], [19]])
    with torch.no_grad():
        y, ref = m(x, Ctx(mask=mask)), reference(m, x, 4, False, mask)
        assert (y - ref)[mask].abs().max().item() < 1e-10  # padded rows: no key left to the reference


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_attention_where_the_hierarchy_is_exact(causal):
    """n <= 2 Nr: level 0 holds every pair. Queries and keys constant over each cluster of the top level (n = 64,
    Nr = 4: levels of 16, 8, 4 and 2 blocks, clusters of up to 8): every coarse mean is exact, and so is the sum."""
    m, _, _ = make_op("mha", "hierarchical", d=D, causal=causal, heads=4, kv_heads=2, block=4)
    s, _, _ = make_op("mha", "softmax", d=D, causal=causal, heads=4, kv_heads=2)
    perturb_params(m)
    s.load_state_dict(m.state_dict())
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        x = torch.randn(2, 8, D, generator=g, dtype=torch.float64)
        assert (m(x, Ctx()) - s(x, Ctx())).abs().max().item() < 1e-12
        x = torch.randn(2, 8, D, generator=g, dtype=torch.float64).repeat_interleave(8, dim=1)  # n = 64
        y, want = m(x, Ctx()), s(x, Ctx())
        assert (y - want).abs().max().item() < 1e-12 * want.abs().max().item()
        # nearly constant over the clusters: the approximation the paper claims, its error first order in the
        # departure (1e-3 here: under 1% of the output's scale, ten times under the error at a departure of 0.3)
        noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
        near = (m(x + 1e-3 * noise, Ctx()) - s(x + 1e-3 * noise, Ctx())).abs().max().item()
        far = (m(x + 0.3 * noise, Ctx()) - s(x + 0.3 * noise, Ctx())).abs().max().item()
        assert near < 1e-2 * want.abs().max().item() and 10 * near < far


def test_causal_does_not_leak_and_bidirectional_does():
    m, _, _ = make_op("mha", "hierarchical", d=D, causal=True, heads=4, kv_heads=2, block=2)
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=37, d=D)
    m, _, _ = make_op("mha", "hierarchical", d=D, causal=False, heads=4, block=2)
    with torch.no_grad(), pytest.raises(AssertionError, match="changed by"):
        assert_no_leak(lambda x: m(x, Ctx()), n=12, d=D)


@pytest.mark.parametrize("causal", [False, True])
def test_left_padding_is_refused(causal):
    m, _, _ = make_op("mha", "hierarchical", d=D, causal=causal, heads=4, block=4)
    x = torch.randn(2, 10, D, dtype=torch.float64)
    left = torch.ones(2, 10, dtype=torch.bool)
    left[0, :3] = False
    with pytest.raises(EvoError, match="E409.*right padding"):
        m(x, Ctx(mask=left))


@pytest.mark.parametrize("args, message", [("block=5", "block=5 is odd"), ("block=4, dropout=0.1", "no dropout"),
                                           ("block=1", "block")])
def test_bad_params_are_refused(args, message):
    with pytest.raises(EvoError, match=message):
        evodsl.parse(f"model m(causal=true) = input(features, d=32) -> mha(hierarchical, {args}, heads=4) "
                     f"-> head(linear, d_out=2)")


@pytest.mark.parametrize("causal", [False, True])
def test_export_form_equals_forward(causal):
    """The gathered form the export runs (16 levels per query from prefix sums, those past n reading nothing) equals
    the forward at every n, below a block included, with GQA and (bidirectional) right padding."""
    from evodsl.ops.attention._hierarchical_export import gathered

    for Nr, kv_heads in ((2, None), (4, 2), (6, 1)):
        m, _, _ = make_op("mha", "hierarchical", d=D, causal=causal, heads=4, kv_heads=kv_heads, block=Nr)
        perturb_params(m)
        for n in (1, 2, Nr + 1, 17, 40):
            x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
            mask = torch.arange(n)[None, :] < torch.tensor([[n], [max(1, n - 5)]])
            for key_mask in (None,) if causal else (None, mask):
                with torch.no_grad():
                    q, k, v = m.qkv(x)
                    o = m.out(gathered(m, q, k, v, key_mask))
                    want = m(x, Ctx(mask=key_mask))
                    real = mask if key_mask is not None else torch.ones_like(mask)
                    assert (o - want)[real].abs().max().item() < 1e-12, (Nr, n)
