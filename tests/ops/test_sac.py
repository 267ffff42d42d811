"""mha(sac) against its equation, in float64: per query i, the k keys j (causal: j <= i; a padded key never) with the
largest edge scores e_ij = (W_a x_i) . (W_c x_j) / sqrt(r), found here by sorting each query's list of scores; then
per head one softmax over those edges of q_i . k_j / sqrt(dh) + e_ij, and the weighted values, written as loops.
The edge predictor learns through the chosen edges' scores; padding equals each sequence alone; the causal form does
not leak (and decodes: test_decode.py)."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_no_leak, head_projections, make_op, output_projection, perturb_params

D = 32


def reference(m, x, k, causal, lengths=None):
    q, kk, v = head_projections(m, x)  # [b, n, h, dh], [b, n, kv, dh]
    a, c = x @ m.edge_q.weight.T, x @ m.edge_k.weight.T  # [b, n, r]
    b, n, h, dh = q.shape
    r, g = a.shape[-1], h // kk.shape[2]
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        L = n if lengths is None else lengths[bb]
        for i in range(n):
            allowed = [j for j in range(L) if not causal or j <= i] or [i]  # a padded query alone: itself
            e = {j: float(a[bb, i] @ c[bb, j]) / math.sqrt(r) for j in allowed}
            edges = sorted(allowed, key=lambda j: -e[j])[:k]
            for hh in range(h):
                cc = hh // g
                logits = torch.stack([q[bb, i, hh] @ kk[bb, j, cc] / math.sqrt(dh) + e[j] for j in edges])
                out[bb, i, hh] = torch.einsum("j,jd->d", logits.softmax(0), torch.stack([v[bb, j, cc] for j in edges]))
    return output_projection(m, out.reshape(b, n, h * dh))


CASES = [  # causal, n, k, kv_heads, chunk
    (False, 13, 4, None, 64), (True, 13, 4, None, 64),
    (False, 17, 5, 2, 4), (True, 17, 5, 2, 4),  # chunks of 4 queries: 17 is no multiple
    (True, 9, 3, 1, 64), (False, 9, 3, 1, 2),
    (False, 5, 8, 2, 64), (True, 6, 8, None, 4),  # k > n: every allowed key (causal: the first queries too)
    (True, 1, 2, None, 64), (False, 2, 1, 2, 64),
]


@pytest.mark.parametrize("causal, n, k, kv_heads, chunk", CASES)
def test_sac_matches_equation(causal, n, k, kv_heads, chunk):
    m, _, _ = make_op("mha", "sac", d=D, causal=causal, heads=4, kv_heads=kv_heads, k=k, chunk=chunk, edge_dim=8)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference(m, x, k, causal)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize("causal", [False, True])
def test_all_edges_and_no_edge_scores_is_softmax_attention(causal):
    """k >= n with the edge predictor zeroed (e_ij = 0): every key is an edge, the logits q . k / sqrt(dh): exactly
    softmax attention; with k < n it is not (the control)."""
    sm, _, _ = make_op("mha", "softmax", d=D, causal=causal, heads=4, kv_heads=2)
    perturb_params(sm)
    x = torch.randn(2, 11, D, dtype=torch.float64)
    for k, same in ((11, True), (40, True), (4, False)):
        m, _, _ = make_op("mha", "sac", d=D, causal=causal, heads=4, kv_heads=2, k=k)
        m.load_state_dict({**m.state_dict(), **sm.state_dict()})
        with torch.no_grad():
            m.edge_q.weight.zero_()
            diff = (m(x, Ctx()) - sm(x, Ctx())).abs().max().item()
        assert diff < 1e-12 if same else diff > 1e-6, (k, diff)


def test_the_edge_predictor_learns():
    """The chosen edges' scores are logits: the loss's gradient reaches W_a and W_c (the paper's policy gradient is
    replaced by this one), and matches a finite difference of the equation."""
    m, _, _ = make_op("mha", "sac", d=D, heads=4, k=3, edge_dim=4)
    perturb_params(m)
    x = torch.randn(1, 10, D, dtype=torch.float64)
    m(x, Ctx()).square().sum().backward()
    grad = m.edge_q.weight.grad[0, 0].item()
    assert m.edge_k.weight.grad.abs().sum() > 0 and grad != 0
    eps = 1e-6
    with torch.no_grad():
        w = m.edge_q.weight
        w[0, 0] += eps
        up = reference(m, x, 3, False).square().sum().item()
        w[0, 0] -= 2 * eps
        down = reference(m, x, 3, False).square().sum().item()
    assert grad == pytest.approx((up - down) / (2 * eps), rel=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_is_each_sequence_alone(causal):
    m, _, _ = make_op("mha", "sac", d=D, causal=causal, heads=4, kv_heads=2, k=4, chunk=4)
    perturb_params(m)
    n, lengths = 12, [12, 7, 3]
    x = torch.randn(len(lengths), n, D, dtype=torch.float64)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        ref = reference(m, x, 4, causal, lengths)
        for i, L in enumerate(lengths):
            assert (y[i, :L] - m(x[i:i + 1, :L], Ctx())[0]).abs().max().item() < 1e-12
            assert (y[i, :L] - ref[i, :L]).abs().max().item() < 1e-10
        assert torch.isfinite(y).all()


def test_causal_does_not_leak_and_bidirectional_does():
    m, _, _ = make_op("mha", "sac", d=D, causal=True, heads=4, kv_heads=2, k=3, chunk=5)
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=20, d=D)
    m, _, _ = make_op("mha", "sac", d=D, causal=False, heads=4, k=3)
    with torch.no_grad(), pytest.raises(AssertionError, match="changed by"):
        assert_no_leak(lambda x: m(x, Ctx()), n=12, d=D)


@pytest.mark.parametrize("bad, match", [
    ({"k": 0}, "k"), ({"edge_dim": 0}, "edge_dim"), ({"chunk": 0}, "chunk"), ({"dropout": 0.1}, "dropout"),
])
def test_bad_params_are_refused(bad, match):
    import evodsl

    with pytest.raises(EvoError, match=match):
        evodsl.parse(f"model m(causal=true) = input(features, d=32) -> mha(sac, heads=4, "
                     f"{', '.join(f'{k}={v}' for k, v in bad.items())}) -> head(linear, d_out=2)")
