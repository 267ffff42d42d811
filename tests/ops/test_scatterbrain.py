"""mha(scatterbrain) against Scatterbrain's equation, in float64, written here with loops: Performer's positive
features phi(x) = exp(w x' - |x'|^2 / 2) / sqrt(m) (x' = x / dh^{1/4}, the module's seeded draw w shared), the
support one SMYRF round's clusters (the XBOX+ transforms hashed by the module's seeded E2LSH projection, the sort
and the balanced cut done here), and

    o_i = (sum_{j in Omega_i} (e_ij - phi_i.phi_j) v_j + sum_j phi_i.phi_j v_j) / (the same with 1 for v_j)

with e_ij = exp(q_i.k_j / sqrt(dh)); the causal form: Omega_i the window i - w + 1 .. i, the low-rank sums over
j <= i. The whole support (C = 1, or a window over the sequence) is softmax attention; a partial one is closer to
softmax than Performer alone with the same features; padding either side keeps the sequence's outputs. Leaks and
decoding: test_leaks.py, test_decode.py."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl.ops import Ctx
from ophelpers import assert_padding_either_side, head_projections, make_op, output_projection, perturb_params, refuses

D = 32


def phi(x, w):
    """FAVOR+ positive features of one vector x [dh]: exp(w x' - |x'|^2 / 2) / sqrt(m), x' = x / dh^{1/4}."""
    xs = x / x.shape[0] ** 0.25
    return torch.exp(w @ xs - xs @ xs / 2) / math.sqrt(w.shape[0])


def support(m, qs, ks, toks, hh):
    """One SMYRF round: {query i: the keys of its cluster}, the row's tokens sorted by a.F(q) and a.G(k), cut into
    C balanced clusters."""
    M2 = max(float(qs[i] @ qs[i]) for i in toks) + max(float(ks[j] @ ks[j]) for j in toks)
    a = m.alpha[hh, :, 0]

    def h(x, pad_at):
        ext = [0.0, 0.0]
        ext[pad_at] = math.sqrt(max(M2 - float(x @ x), 0.0))
        return float(a[:-2] @ x) + a[-2] * ext[0] + a[-1] * ext[1]

    qo, ko = sorted(toks, key=lambda i: h(qs[i], 1)), sorted(toks, key=lambda j: h(ks[j], 0))
    N, C = len(toks), m.clusters
    return {i: ko[c * N // C:(c + 1) * N // C] for c in range(C) for i in qo[c * N // C:(c + 1) * N // C]}


def reference(m, x, keep=None, sparse=True, causal=False):
    q, k, v = head_projections(m, x)
    b, n, h, dh = q.shape
    g = h // k.shape[2]
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        toks = [i for i in range(n) if keep is None or keep[bb, i]]
        for hh in range(h):
            qs, ks, vs = q[bb, :, hh], k[bb, :, hh // g], v[bb, :, hh // g]
            fq, fk = {i: phi(qs[i], m.w) for i in toks}, {j: phi(ks[j], m.w) for j in toks}
            if causal:  # the local window
                omega = {i: [j for j in toks if i - m.window < j <= i] if sparse else [] for i in toks}
            else:
                omega = support(m, qs, ks, toks, hh) if sparse else {i: [] for i in toks}
            for i in toks:
                past = [j for j in toks if j <= i or not causal]
                num = sum(fq[i] @ fk[j] * vs[j] for j in past)
                den = sum(fq[i] @ fk[j] for j in past)
                for j in omega[i]:
                    e = torch.exp(qs[i] @ ks[j] / math.sqrt(dh)) - fq[i] @ fk[j]
                    num, den = num + e * vs[j], den + e
                out[bb, i, hh] = num / den
    return output_projection(m, out.reshape(b, n, h * dh))


CASES = [  # clusters, features, n, kv_heads
    (4, 16, 23, None),  # n no multiple of C
    (3, 8, 17, 2),  # grouped K/V heads, fewer features than dh
    (5, 24, 20, 1),  # a multiple of C, one K/V head
    (6, 16, 4, None),  # fewer tokens than clusters: some empty
]


@pytest.mark.parametrize("clusters, features, n, kv_heads", CASES)
def test_scatterbrain_matches_equation(clusters, features, n, kv_heads):
    m, _, _ = make_op("mha", "scatterbrain", d=D, heads=4, kv_heads=kv_heads, clusters=clusters, features=features,
                      seed=n)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference(m, x)
    assert (y - ref).abs().max().item() < 1e-10 * ref.abs().max().item()
    assert (y - reference(m, x, sparse=False)).abs().max().item() > 1e-6 * ref.abs().max().item()  # S is there


CAUSAL_CASES = [  # window, features, n, kv_heads
    (4, 16, 23, None),  # n no multiple of the window
    (5, 8, 17, 2),  # grouped K/V heads
    (1, 12, 9, 1),  # the window: the query alone
    (30, 16, 7, None),  # a window past the sequence
]


@pytest.mark.parametrize("window, features, n, kv_heads", CAUSAL_CASES)
def test_causal_form_matches_equation(window, features, n, kv_heads):
    """The causal form: S on the window i - w + 1 .. i, the low-rank sums over j <= i."""
    m, _, _ = make_op("mha", "scatterbrain", d=D, heads=4, kv_heads=kv_heads, causal=True, window=window,
                      features=features, seed=n)
    m.chunk = 8  # the prefix sums in chunks of 8: n spans several
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference(m, x, causal=True)
    assert (y - ref).abs().max().item() < 1e-10 * ref.abs().max().item()
    if window < n:
        assert (y - reference(m, x, sparse=False, causal=True)).abs().max().item() > 1e-6 * ref.abs().max().item()


def test_a_window_over_the_sequence_is_causal_softmax_attention():
    m, _, _ = make_op("mha", "scatterbrain", d=D, heads=4, kv_heads=2, causal=True, window=19, features=8)
    perturb_params(m)
    x = torch.randn(2, 19, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = softmax_attention(m, x, causal=True)
    with torch.no_grad():
        got = m(x, Ctx())
    assert (got - want).abs().max().item() < 1e-12 * want.abs().max().item()


def softmax_attention(m, x, causal=False):
    q, k, v = head_projections(m, x)
    g = m.heads // k.shape[2]
    s = torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(g, 2)) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    w = s.softmax(-1)
    return output_projection(m, torch.einsum("bhij,bjhd->bihd", w, v.repeat_interleave(g, 2)).flatten(2))


def test_the_whole_support_is_softmax_attention():
    """C = 1: every pair in the support, where S holds exp(q.k / sqrt(dh)) less the low-rank part's estimate."""
    for kv_heads in (None, 2):
        m, _, _ = make_op("mha", "scatterbrain", d=D, heads=4, kv_heads=kv_heads, clusters=1, features=8)
        perturb_params(m)
        x = torch.randn(2, 19, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        want = softmax_attention(m, x)
        with torch.no_grad():
            got = m(x, Ctx())
        assert (got - want).abs().max().item() < 1e-12 * want.abs().max().item()


def test_closer_to_softmax_than_performer_alone():
    """The paper's claim (section 4.1: the sparse part removes the low-rank estimate's error on its support): with
    C = 4 clusters of 64 tokens and m = 16 features, Performer with the same features and weights is further from
    softmax attention in every one of 4 draws; the mean error ratio measured here is 0.81 (0.79 .. 0.85; required:
    < 0.9). With random weights the attention is spread: a quarter of the pairs exact removes a fifth of the error."""
    ratios = []
    for seed in range(4):
        m, _, _ = make_op("mha", "scatterbrain", d=D, heads=4, clusters=4, features=16, seed=seed)
        perturb_params(m, seed=seed, scale=0.3)
        perf, _, _ = make_op("mha", "performer", d=D, heads=4, features=16)
        perf.load_state_dict(m.state_dict(), strict=False)
        x = torch.randn(2, 64, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        with torch.no_grad():
            want = softmax_attention(m, x)
            err = (m(x, Ctx()) - want).abs().mean().item()
            err_perf = (perf(x, Ctx()) - want).abs().mean().item()
        assert torch.equal(perf.w, m.w) and err < err_perf, (seed, err, err_perf)
        ratios.append(err / err_perf)
    assert sum(ratios) / len(ratios) < 0.9, ratios


@pytest.mark.parametrize("causal", [False, True])
def test_padding_either_side_gets_no_weight(causal):
    m, _, _ = make_op("mha", "scatterbrain", d=D, heads=4, kv_heads=2, clusters=3, features=16, causal=causal, window=4)
    perturb_params(m)
    assert_padding_either_side(m, lambda x, mask: reference(m, x, keep=mask, causal=causal), d=D)


def test_dropout_and_bad_heads_are_refused():
    refuses("scatterbrain", {"window=0": "window"}, causal=True)
    refuses("scatterbrain", {"dropout=0.1": "no dropout", "kv_heads=3": "heads=4 is not a multiple of kv_heads=3",
                             "features=0": "features"})


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_are_the_equations(causal):
    """The gradient through the clusters (the window), the features and the stabilising constants (finite
    differences)."""
    m, _, _ = make_op("mha", "scatterbrain", d=8, heads=2, kv_heads=1, clusters=3, features=6, causal=causal, window=3)
    perturb_params(m, scale=0.2)
    x = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x, Ctx()), (x,))
