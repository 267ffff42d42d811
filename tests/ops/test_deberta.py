"""pos(deberta): mha(softmax) with DeBERTa's disentangled scores against a float64 reference written from the
equation (einsum and a loop over the pairs, none of the module's helpers): A_ij = (q_i·k_j + q_i·Kr_δ + k_j·Qr_δ)
/ sqrt(3 dh), δ(i, j) = clamp(i - j, -k, k - 1) + k, as HF computes it (p2c at δ(i, j)). Shapes: n above k (the
clipping), n below k, GQA, share=true (the layer's own projections), causal; the key bias removed; refusals."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import make_op, perturb_params


def reference(m, x, k, causal, share, terms="both"):
    """The disentangled attention of module m (weights only) on x [b, n, d], float64, from the equation."""
    b, n, d = x.shape
    h, kv, dh = m.heads, m.kv_heads, m.head_dim
    lin = lambda t, layer: t @ layer.weight.t() + (layer.bias if layer.bias is not None else 0)  # noqa: E731
    q = lin(x, m.q_proj).view(b, n, h, dh)
    key = lin(x, m.k_proj).view(b, n, kv, dh).repeat_interleave(h // kv, dim=2)
    v = lin(x, m.v_proj).view(b, n, kv, dh).repeat_interleave(h // kv, dim=2)
    P = m.pos_source.weight  # [2k, d]
    c2p, p2c = terms in ("both", "c2p"), terms in ("both", "p2c")
    if c2p:
        kr_layer = m.k_proj if share else m.pos.pos_proj
        Kr = lin(P, kr_layer).view(2 * k, -1, dh).repeat_interleave(h // (kr_layer.out_features // dh), dim=1)
    if p2c:
        Qr = lin(P, m.q_proj if share else m.pos.pos_q_proj).view(2 * k, h, dh)
    scale = math.sqrt((1 + c2p + p2c) * dh)  # HF: 1 + len(pos_att_type)
    A = torch.empty(b, h, n, n, dtype=x.dtype)
    for i in range(n):
        for j in range(n):
            delta = min(max(i - j, -k), k - 1) + k
            a = torch.einsum("bhd,bhd->bh", q[:, i], key[:, j])
            if c2p:
                a = a + torch.einsum("bhd,hd->bh", q[:, i], Kr[delta])
            if p2c:
                a = a + torch.einsum("bhd,hd->bh", key[:, j], Qr[delta])
            A[:, :, i, j] = a / scale
    if causal:
        A = A.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("bhij,bjhd->bihd", A.softmax(-1), v).reshape(b, n, h * dh)
    return lin(o, m.o_proj)


CASES = [(2, 11, 32, 4, {}, 4, False), (1, 5, 32, 4, {}, 8, False), (2, 11, 32, 4, {"kv_heads": 2}, 4, False),
         (2, 9, 24, 2, {}, 3, True), (1, 13, 32, 4, {"kv_heads": 1, "bias": False}, 2, False),
         (2, 10, 32, 4, {"kv_heads": 2}, 16, False)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b,n,d,heads,extra,k,share", CASES)
def test_matches_the_disentangled_equation(b, n, d, heads, extra, k, share, causal):
    m, _, _ = make_op("mha", "softmax", d=d, heads=heads, causal=causal, pos=("deberta", {"k": k, "share": share}),
                      **extra)
    perturb_params(m)
    assert m.k_proj.bias is None  # DeBERTa's attention has no key bias
    x = torch.randn(b, n, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        got = m(x, Ctx())
    want = reference(m, x, k, causal, share)
    assert (got - want).abs().max().item() < 1e-10


@pytest.mark.parametrize("terms", ["c2p", "p2c"])
@pytest.mark.parametrize("share", [False, True])
def test_one_position_term(terms, share):
    """HF's pos_att_type with one term: that term alone, the scale 1/sqrt(2 dh), its projection only."""
    m, _, _ = make_op("mha", "softmax", d=32, heads=4, causal=True, kv_heads=2,
                      pos=("deberta", {"k": 3, "share": share, "terms": terms}))
    perturb_params(m)
    assert share or (hasattr(m.pos, "pos_proj"), hasattr(m.pos, "pos_q_proj")) == (terms == "c2p", terms == "p2c")
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        got = m(x, Ctx())
    assert (got - reference(m, x, 3, True, share, terms)).abs().max().item() < 1e-10


def test_key_bias_kept_on_request_and_counted():
    m, _, _ = make_op("mha", "softmax", d=32, heads=4, pos=("deberta", {"k": 4, "key_bias": True}))
    assert m.k_proj.bias is not None
    plain, _, _ = make_op("mha", "softmax", d=32, heads=4, pos=("deberta", {"k": 4}))
    assert sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in plain.parameters()) == 32


@pytest.mark.parametrize("arg,field", [("softcap=30.0", "softcap"), ("qk_norm=true", "qk_norm"), ("scale=0.5", "scale"),
                                       ("head_dim=4", "head_dim")])
def test_refuses_what_has_no_form(arg, field):
    spec = f"""
d_model = 32
model m = input(features, d=32) -> pos(deberta, k=8) -> residual(mha(softmax, heads=4, {arg})) -> head(linear, d_out=2)
"""
    with pytest.raises(EvoError) as e:
        evodsl.compile(spec)
    assert field in str(e.value) and "deberta" in str(e.value)
