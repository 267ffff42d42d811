"""pos(huang): mha(softmax) with Huang et al.'s four relative position methods (arXiv:2009.13658) against a float64
reference written from each method's score (einsum over the pairs with δ laid out [n, n], none of the module's helpers):
δ = clip(j − i, k); method 1: (q·k) w_|δ|; 2: (q·k) w_δ; 3: Σ_c q_c k_c a_δc; 4: (q + a_δ)·(k + a_δ) − a_δ·a_δ; all
over sqrt(dh). Shapes: n past k (the clipping, method 3's far matmuls), n below k, k = 1, GQA, causal; decoding
at an offset; padding; refusals."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import decode_in_pieces, head_projections, make_op, output_projection, perturb_params


def reference(m, x, method, k, causal, mask=None):
    b, n, _ = x.shape
    h, g, dh = m.heads, m.heads // m.kv_heads, m.head_dim
    q, key, v = head_projections(m, x)
    key, v = key.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    delta = (j - i).clamp(-k, k)  # δ = clip(j − i, k), [n, n]
    qk = torch.einsum("bihc,bjhc->bhij", q, key)
    if method == 1:
        e = qk * m.pos.w[:, delta.abs()]
    elif method == 2:
        e = qk * m.pos.w[:, delta + k]
    elif method == 3:  # sum_prod(q_i, k_j, a_δ)
        e = torch.einsum("bihc,bjhc,ijc->bhij", q, key, m.pos.a[delta + k])
    else:  # (q_i + a_δ)·(k_j + a_δ) − a_δ·a_δ
        a = m.pos.a[delta + k][None, :, :, None, :]  # [1, i, j, 1, dh]
        e = ((q[:, :, None] + a) * (key[:, None, :] + a)).sum(-1) - (a * a).sum(-1)  # [b, i, j, h]
        e = e.permute(0, 3, 1, 2)
    e = e / math.sqrt(dh)
    if causal:
        e = e.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        e = e.masked_fill(~mask[:, None, None, :], float("-inf"))
    o = torch.einsum("bhij,bjhc->bihc", e.softmax(-1), v).reshape(b, n, h * dh)
    return output_projection(m, o)


CASES = [(2, 13, 32, 4, {"kv_heads": 2}, 3), (1, 5, 32, 4, {}, 8), (1, 9, 24, 2, {"kv_heads": 1, "bias": False}, 1)]


@pytest.mark.parametrize("method", [1, 2, 3, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b,n,d,heads,extra,k", CASES)
def test_matches_the_method(method, b, n, d, heads, extra, k, causal):
    m, _, _ = make_op("mha", "softmax", d=d, heads=heads, causal=causal, pos=("huang", {"method": method, "k": k}),
                      **extra)
    perturb_params(m, seed=method)
    x = torch.randn(b, n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(m(x, Ctx()), reference(m, x, method, k, causal), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", [1, 2, 3, 4])
def test_starts_as_plain_attention_where_the_method_allows(method):
    """w = 1 (methods 1, 2) and a = 1 (method 3) give softmax attention's scores at init; method 4's a is small."""
    m, _, _ = make_op("mha", "softmax", d=32, heads=4, causal=True, pos=("huang", {"method": method, "k": 4}))
    plain, _, _ = make_op("mha", "softmax", d=32, heads=4, causal=True)
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("pos.")})
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    err = (m(x, Ctx()) - plain(x, Ctx())).abs().max().item()
    assert err < 1e-12 if method < 4 else err < 0.05


@pytest.mark.parametrize("method", [1, 2, 3, 4])
def test_decodes_at_an_offset(method):
    m, _, _ = make_op("mha", "softmax", d=32, heads=4, kv_heads=2, causal=True, pos=("huang", {"method": method, "k": 3}))
    perturb_params(m, seed=5)
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    got, _ = decode_in_pieces(m, x, [5, 1, 4, 2])
    torch.testing.assert_close(got, m(x, Ctx()), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", [2, 3])
def test_padded_keys_get_no_weight(method):
    m, _, _ = make_op("mha", "softmax", d=32, heads=4, pos=("huang", {"method": method, "k": 3}))
    perturb_params(m, seed=6)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False
    torch.testing.assert_close(m(x, Ctx(mask=mask))[0, :6], reference(m, x, method, 3, False, mask)[0, :6],
                               rtol=1e-10, atol=1e-10)


def test_every_parameter_learns():
    for method in (1, 3, 4):
        m, _, _ = make_op("mha", "softmax", d=32, heads=4, pos=("huang", {"method": method, "k": 3}))
        perturb_params(m)
        m(torch.randn(2, 9, 32, dtype=torch.float64), Ctx()).square().sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


@pytest.mark.parametrize("src,want", [
    ("model m = input(features, d=32) -> pos(huang, method=5) -> mha", "method"),
    ("model m = input(features, d=32) -> pos(huang) -> mha(softmax, softcap=30.0)", "no form with pos\\(huang\\)"),
    ("model m = input(features, d=32) -> pos(huang) -> mha(local, window=4)", "E302(.|\n)*pos\\(huang\\) works inside: mha\\(softmax\\)"),
])
def test_refusals(src, want):
    with pytest.raises(EvoError, match=want):
        evodsl.compile(src)
