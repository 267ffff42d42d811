"""mha(routing) against the Routing Transformer's equations, in float64, written here with loops: per row and head
q^ and k^ routed to the module's centroids (the seeded centroids shared, the routing recomputed here); each query
reads, by softmax of q . k / sqrt(dh), the w keys nearest its centroid (causal: the last w earlier keys routed to
it), or its own key when there is none. A second test holds the centroids' training update to the EMA rule, and
with one cluster and a window over the sequence it is softmax attention."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl.ops import Ctx
from ophelpers import assert_padding_either_side, assert_no_leak, head_projections, make_op, output_projection, perturb_params, refuses

D = 32


def route(t, mu):
    """t [dh] -> the similarities of t / |t| to each centroid (a list)."""
    u = t / t.norm()
    return [float(u @ mu[c]) for c in range(mu.shape[0])]


def argmax(vals):
    return max(range(len(vals)), key=lambda c: (vals[c], -c))


def reference(m, x, key_mask=None, causal=False, window=None):
    q, k, v = head_projections(m, x)
    b, n, h, dh = q.shape
    g = h // k.shape[2]
    w = window or m.window
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        tokens = [j for j in range(n) if key_mask is None or key_mask[bb, j]]
        for hh in range(h):
            mu = m.centroids[hh]
            ks = {j: route(k[bb, j, hh // g], mu) for j in tokens}
            for i in range(n):
                c = argmax(route(q[bb, i, hh], mu))
                if causal:
                    keys = [j for j in tokens if j <= i and argmax(ks[j]) == c][-w:]
                else:
                    keys = sorted(tokens, key=lambda j: -ks[j][c])[:w]
                keys = keys or [i]
                s = torch.stack([q[bb, i, hh] @ k[bb, j, hh // g] / math.sqrt(dh) for j in keys])
                out[bb, i, hh] = sum(a * v[bb, j, hh // g] for a, j in zip(s.softmax(0), keys))
    return output_projection(m, out.reshape(b, n, h * dh))


CASES = [  # causal, clusters, window, n, kv_heads
    (False, 3, 5, 23, None), (True, 3, 5, 23, None),  # n no multiple of anything
    (False, 4, 4, 17, 2), (True, 4, 4, 17, 2),  # grouped K/V heads
    (False, 2, 8, 20, 1), (True, 5, 3, 20, 1),  # one K/V head; causal: queries whose cluster holds no earlier key
    (False, 3, 12, 7, None), (True, 2, 12, 7, None),  # n smaller than the window
    (True, 8, 1, 11, None),  # one key a query: the last earlier one routed with it
]


@pytest.mark.parametrize("causal, clusters, window, n, kv_heads", CASES)
def test_routing_matches_equation(causal, clusters, window, n, kv_heads):
    m, _, _ = make_op("mha", "routing", d=D, causal=causal, heads=4, kv_heads=kv_heads, clusters=clusters,
                      window=window, seed=n)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference(m, x, causal=causal)
        assert (y - ref).abs().max().item() < 1e-10 * ref.abs().max().item()
        if n > window:  # the comparison sees the routing: every key instead of the cluster's differs
            assert (y - reference(m, x, causal=causal, window=n)).abs().max().item() > 1e-6 or causal


def test_centroids_move_by_the_ema_of_their_members():
    """Training: the forward's output uses the centroids as they were; then each centroid with members becomes
    normalise(lambda mu + (1 - lambda) mean of its routed unit queries and keys), padding excluded; one without keeps
    its place. In eval they do not move."""
    m, _, _ = make_op("mha", "routing", d=D, heads=4, kv_heads=2, clusters=40, window=4, decay=0.9)
    perturb_params(m)
    x = torch.randn(2, 15, D, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    mask = torch.ones(2, 15, dtype=torch.bool)
    mask[1, 11:] = False
    before = m.centroids.clone()
    with torch.no_grad():
        m.eval()(x, Ctx(mask=mask))
        assert torch.equal(m.centroids, before)
        want_out = m(x, Ctx(mask=mask))
        got_out = m.train()(x, Ctx(mask=mask))
    assert torch.equal(got_out, want_out)
    with torch.no_grad():
        q, k, _ = head_projections(m, x)
    k = k.repeat_interleave(2, dim=2)
    moved = 0
    for hh in range(4):
        for c in range(40):
            members = [t[bb, j, hh] / t[bb, j, hh].norm() for t in (q, k) for bb in range(2) for j in range(15)
                       if mask[bb, j] and argmax(route(t[bb, j, hh], before[hh])) == c]
            want = before[hh, c]
            if members:
                want = 0.9 * want + 0.1 * sum(members) / len(members)
                want = want / want.norm()
                moved += 1
            assert (m.centroids[hh, c] - want).abs().max().item() < 1e-12
    assert 40 < moved < 160  # some clusters empty, many not


@pytest.mark.parametrize("causal", [False, True])
def test_one_cluster_over_the_sequence_is_softmax_attention(causal):
    n = 13
    m, _, _ = make_op("mha", "routing", d=D, causal=causal, heads=4, kv_heads=2, clusters=1, window=n)
    soft, _, _ = make_op("mha", "softmax", d=D, causal=causal, heads=4, kv_heads=2)
    perturb_params(m)
    soft.load_state_dict({k: v for k, v in m.state_dict().items() if k != "centroids"})
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        want = soft(x, Ctx())
        assert (m(x, Ctx()) - want).abs().max().item() < 1e-10 * want.abs().max().item()


@pytest.mark.parametrize("causal", [False, True])
def test_padding_either_side_takes_no_part(causal):
    m, _, _ = make_op("mha", "routing", d=D, causal=causal, heads=4, kv_heads=2, clusters=3, window=4)
    perturb_params(m)
    assert_padding_either_side(m, lambda x, mask: reference(m, x, key_mask=mask, causal=causal), both_rows=True, d=D)


def test_causal_does_not_leak_through_the_clusters():
    """Two and three clusters over 25 tokens: every cluster mixes earlier and later keys."""
    for clusters, kv_heads in ((2, None), (3, 2)):
        m, _, _ = make_op("mha", "routing", d=D, causal=True, heads=4, kv_heads=kv_heads, clusters=clusters, window=3)
        perturb_params(m)
        with torch.no_grad():
            assert_no_leak(lambda x: m(x, Ctx()), n=25, d=D)


def test_top_w_keys_with_a_causal_mask_alone_leaks():
    """The implementation's balanced top-w keys, then j <= i: a later key nearer the centroid pushes an earlier one
    out of the window. Written in the reference: it leaks."""
    m, _, _ = make_op("mha", "routing", d=D, heads=2, clusters=2, window=3)
    perturb_params(m)

    @torch.no_grad()
    def top_then_mask(x):
        q, k, v = head_projections(m, x)
        out = torch.zeros_like(q)
        for bb in range(x.shape[0]):
            for hh in range(2):
                mu = m.centroids[hh]
                for i in range(x.shape[1]):
                    c = argmax(route(q[bb, i, hh], mu))
                    top = sorted(range(x.shape[1]), key=lambda j: -route(k[bb, j, hh], mu)[c])[:3]
                    keys = [j for j in top if j <= i] or [i]
                    a = torch.stack([q[bb, i, hh] @ k[bb, j, hh] for j in keys]).softmax(0)
                    out[bb, i, hh] = sum(aj * v[bb, j, hh] for aj, j in zip(a, keys))
        return out.flatten(2)

    with pytest.raises(AssertionError, match="changed by"):
        assert_no_leak(top_then_mask, n=12, d=D)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_are_the_equations(causal):
    m, _, _ = make_op("mha", "routing", d=16, causal=causal, heads=2, kv_heads=1, clusters=3, window=3)
    perturb_params(m, scale=0.2)
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x, Ctx()), (x,))


def test_bad_params_are_refused():
    refuses("routing", {"dropout=0.1": "no dropout", "kv_heads=3": "heads=4 is not a multiple of kv_heads=3",
                        "window=0": "window", "decay=1.5": "decay"}, causal=True, ok="clusters=4, window=8")


def test_float16_keeps_the_own_key_penalty_finite():
    m, _, _ = make_op("mha", "routing", d=D, causal=True, heads=4, clusters=4, window=3)
    perturb_params(m, scale=0.3)
    x = torch.randn(2, 19, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        want = m(x, Ctx())
        got = m.half()(x.half(), Ctx()).double()
    assert torch.isfinite(got).all()
    assert (got[:, 0] - want[:, 0]).abs().max().item() < 1e-2 * want.abs().max().item()
