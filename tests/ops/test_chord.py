"""mha(chord) against its defining equation in float64: each factor W^(m) built as a dense n x n matrix, row i's
entries at columns i and (i + 2^k) mod n (k < ceil(log2 n)) from the MLP written out here (two affine maps, GELU
by erf), then out = W^(M) ... W^(1) V per head, V's heads shared by groups of heads (kv_heads); the export's form
(all 1 + ceil(log2 max_len) links, the long ones weighted 0) gives the same; ceil(log2 n) factors reach every
position from every other (the Chord protocol's claim); the refusals. Padding: tests/test_padding.py (links into
padding get no weight)."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl import EvoError, parse
from evodsl.ops import Ctx
from ophelpers import make_op, output_projection, perturb_params

D = 32


def affine(layer, t):
    return t @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def entries(mlp, x):
    """f_m(x) [b, n, heads * span]: affine, GELU (0.5 z (1 + erf(z / sqrt 2))), affine."""
    z = affine(mlp[0], x)
    return affine(mlp[2], 0.5 * z * (1 + torch.erf(z / math.sqrt(2))))


def dense_factor(e, n):
    """e [n, span] (one sequence, one head) -> W [n, n]: W[i, i] = e[i, 0], W[i, (i + 2^k) mod n] = e[i, 1 + k]."""
    K = math.ceil(math.log2(n)) if n > 1 else 0
    W = torch.zeros(n, n, dtype=e.dtype)
    for i in range(n):
        W[i, i] += e[i, 0]
        for k in range(K):
            W[i, (i + 2 ** k) % n] += e[i, 1 + k]
    return W


def reference(m, x, heads, kv_heads, head_dim):
    b, n, _ = x.shape
    kv = kv_heads or heads
    v = affine(m.v_proj, x).view(b, n, kv, head_dim)
    ws = [entries(f, x).view(b, n, heads, -1) for f in m.entries]
    out = torch.zeros(b, n, heads, head_dim, dtype=x.dtype)
    for bi in range(b):
        for hh in range(heads):
            u = v[bi, :, hh // (heads // kv)]
            for w in ws:  # W^(1) first
                u = dense_factor(w[bi, :, hh], n) @ u
            out[bi, :, hh] = u
    return output_projection(m, out.reshape(b, n, heads * head_dim))


CASES = [  # n, heads, kv_heads, head_dim, factors, max_len
    (13, 4, None, None, 2, 64), (8, 4, 2, None, 2, 8),  # n not a power of 2; one (max_len = n: every entry read)
    (5, 4, 1, 8, 3, 100), (2, 2, None, None, 1, 16), (1, 4, 2, None, 2, 16),  # one link; none but itself
    (17, 2, 1, 12, 2, 17),
]


@pytest.mark.parametrize("n,heads,kv_heads,head_dim,factors,max_len", CASES)
def test_chord_matches_the_dense_factors(n, heads, kv_heads, head_dim, factors, max_len):
    m, _, _ = make_op("mha", "chord", d=D, heads=heads, kv_heads=kv_heads, head_dim=head_dim, factors=factors,
                      max_len=max_len)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference(m, x, heads, kv_heads, head_dim or D // heads)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


def test_export_form_equals_the_eager_form(monkeypatch):
    """Under export every row gathers all 1 + ceil(log2 max_len) links, those with 2^k >= n weighted 0."""
    m, _, _ = make_op("mha", "chord", d=D, heads=4, kv_heads=2, max_len=64)
    perturb_params(m)
    x = torch.randn(2, 11, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mask = torch.arange(11)[None] < torch.tensor([11, 7])[:, None]
    with torch.no_grad():
        want, want_masked = m(x, Ctx()), m(x, Ctx(mask=mask))
        monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
        assert (m(x, Ctx()) - want).abs().max().item() < 1e-12 * want.abs().max().item()
        assert (m(x, Ctx(mask=mask)) - want_masked).abs().max().item() < 1e-12 * want.abs().max().item()


def test_log_n_factors_reach_every_position():
    """ceil(log2 n) factors: every output position depends on every input position (a dense product); two
    factors do not at n = 13 (offsets 0, 1, 2, 4, 8: no two sum to 7 or 11 mod 13)."""
    n = 13
    for factors, dense in ((4, True), (2, False)):
        m, _, _ = make_op("mha", "chord", d=D, heads=2, factors=factors, max_len=16)
        perturb_params(m)
        x = torch.randn(1, n, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        with torch.no_grad():
            y = m(x, Ctx())
            reach = []
            for j in range(n):  # which outputs move when token j alone changes
                x2 = x.clone()
                x2[0, j] += 1.0
                reach.append(((m(x2, Ctx()) - y)[0].abs().amax(-1) > 1e-12))
        assert bool(torch.stack(reach).all()) == dense


def test_refusals():
    head = "d_model = 32\nmodel m{} = input(tokens, vocab=11) -> embed(token) -> mha(chord{})"
    with pytest.raises(EvoError, match="mha\\(chord\\) has no causal form"):
        parse(head.format("(causal=true)", ", max_len=64"))
    with pytest.raises(EvoError, match="no attention weights to drop out"):
        parse(head.format("", ", max_len=64, dropout=0.1"))
    with pytest.raises(EvoError, match="max_len"):
        parse(head.format("", ""))
    for bad in (", max_len=64, factors=0", ", max_len=0", ", max_len=64, hidden=0", ", max_len=64, kv_heads=3"):
        with pytest.raises(EvoError):
            parse(head.format("", bad))
    parse(head.format("", ", max_len=64, factors=3, hidden=16, kv_heads=2, bias=false"))
    m, _, _ = make_op("mha", "chord", d=D, heads=4, max_len=8)
    with pytest.raises(EvoError, match="max_len=8"):
        m(torch.randn(1, 9, D, dtype=torch.float64), Ctx())


def test_the_factors_flops_grow_as_n_log_n():
    """The factors' matmuls alone (bmm; the projections and MLPs are addmm/mm, n d^2, and lead the op's total at
    small d: test_growth.py reads its FLOPs as n there, its bytes as n log n): 2 M b h n (1 + ceil(log2 n)) dh,
    of class n log n over n = 256 .. 2048."""
    from torch.utils.flop_counter import FlopCounterMode

    from growth import classify

    m, _, _ = make_op("mha", "chord", d=D, heads=2, factors=2, max_len=2048, dtype=torch.float32)
    ns, got = (256, 512, 1024, 2048), []
    for n in ns:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            m(torch.randn(1, n, D), Ctx())
        got.append(fc.get_flop_counts()["Global"][torch.ops.aten.bmm])
        assert got[-1] == 2 * 2 * 2 * n * (1 + math.ceil(math.log2(n))) * (D // 2)
    assert classify(ns, got) == "n log n"
