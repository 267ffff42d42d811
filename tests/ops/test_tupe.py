"""pos(tupe): mha(softmax) with TUPE's untied positional correlation against a float64 reference from the paper's
equation (a loop over the pairs): α_ij = (x_i W_Q)(x_j W_K)^T / sqrt(2 dh) + reset_θ((p_i U_Q)(p_j U_K)^T /
sqrt(2 dh) [+ b_bucket(j - i)], i, j), p LayerNorm-ed; abs and rel, with and without the [CLS] reset, GQA,
causal, n past the exact buckets; decoding's term at an offset; left padding, a heads mismatch refused."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import make_op, perturb_params


def t5_bucket(r: int, causal: bool, buckets: int, max_distance: int) -> int:
    """T5's bucket of the relative position r = j - i, written out from Mesh TensorFlow's rule."""
    side = 0
    if causal:
        dist = max(-r, 0)
    else:
        buckets //= 2
        side = buckets if r > 0 else 0
        dist = abs(r)
    exact = buckets // 2
    if dist < exact:
        return side + dist
    far = exact + int(math.log(dist / exact) / math.log(max_distance / exact) * (buckets - exact))
    return side + min(far, buckets - 1)


def reference(m, x, p, causal):
    b, n, d = x.shape
    h, kv, dh = m.heads, m.kv_heads, m.head_dim
    t = m.pos_source
    lin = lambda v, layer: v @ layer.weight.t() + (layer.bias if layer.bias is not None else 0)  # noqa: E731
    q = lin(x, m.q_proj).view(b, n, h, dh)
    key = lin(x, m.k_proj).view(b, n, kv, dh).repeat_interleave(h // kv, dim=2)
    v = lin(x, m.v_proj).view(b, n, kv, dh).repeat_interleave(h // kv, dim=2)
    P = t.pos[:n]
    P = (P - P.mean(-1, keepdim=True)) / torch.sqrt(P.var(-1, unbiased=False, keepdim=True) + t.ln.eps) * t.ln.weight \
        + t.ln.bias
    pq, pk = lin(P, t.u_q).view(n, h, dh), lin(P, t.u_k).view(n, h, dh)
    A = torch.einsum("bihd,bjhd->bhij", q, key) / math.sqrt(2 * dh)
    for i in range(n):
        for j in range(n):
            term = (pq[i] * pk[j]).sum(-1) / math.sqrt(2 * dh)
            if p.get("mode") == "rel":
                term = term + t.rel[t5_bucket(j - i, causal, p["buckets"], p["max_distance"])]
            if p.get("cls") and i == 0:
                term = t.theta[0]
            elif p.get("cls") and j == 0:
                term = t.theta[1]
            A[:, :, i, j] += term
    if causal:
        A = A.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("bhij,bjhd->bihd", A.softmax(-1), v).reshape(b, n, h * dh)
    return lin(o, m.o_proj)


POS = [{"max_len": 24}, {"max_len": 24, "cls": True}, {"mode": "rel", "max_len": 24, "buckets": 8, "max_distance": 12},
       {"mode": "rel", "max_len": 24, "cls": True, "buckets": 6, "max_distance": 5}]
SHAPES = [(2, 11, 32, 4, {}), (1, 17, 32, 4, {"kv_heads": 2}), (2, 3, 24, 2, {"kv_heads": 1, "bias": False})]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b,n,d,heads,extra", SHAPES)
@pytest.mark.parametrize("p", POS, ids=lambda p: "-".join(f"{k}{v}" for k, v in p.items()))
def test_matches_the_paper(p, b, n, d, heads, extra, causal):
    m, _, _ = make_op("mha", "softmax", d=d, heads=heads, causal=causal, pos=("tupe", {"heads": heads, **p}), **extra)
    perturb_params(m)
    x = torch.randn(b, n, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        got = m(x, Ctx())
    assert (got - reference(m, x, p, causal)).abs().max().item() < 1e-10


@pytest.mark.parametrize("p", POS[1:4:2], ids=["abs-cls", "rel-cls"])
def test_term_at_an_offset_is_the_dense_one(p):
    """Decoding asks bias(i, j) for queries start.. against keys 0..: the rows of the dense term."""
    m, _, _ = make_op("mha", "softmax", d=16, heads=2, causal=True, pos=("tupe", {"heads": 2, **p}))
    perturb_params(m)
    m.pos_source(torch.zeros(1, 9, 16, dtype=torch.float64), ctx := Ctx())
    m.pos.bind(ctx)
    with torch.no_grad():
        dense = m.pos.dense(9, "cpu")
        i, j = torch.arange(5, 9)[:, None], torch.arange(9)[None, :]
        assert (m.pos.bias(i, j) - dense[:, 5:9]).abs().max().item() < 1e-12


def test_refuses_left_padding_long_sequences_and_other_heads():
    m, _, _ = make_op("mha", "softmax", d=16, heads=2, pos=("tupe", {"heads": 2, "max_len": 8}))
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    with pytest.raises(EvoError, match="right padding"):
        m(x, Ctx(mask=torch.tensor([[True] * 6, [False, False] + [True] * 4])))
    with pytest.raises(EvoError, match="8 positions"):
        m.pos_source(x, ctx := Ctx())
        m.pos.bind(ctx)
        m.pos.bias(torch.arange(9)[:, None], torch.arange(9)[None, :])
    with pytest.raises(EvoError, match="heads=4"):
        evodsl.compile("d_model = 16\nmodel m = input(features, d=16) -> pos(tupe, heads=4) -> "
                       "residual(mha(softmax, heads=2)) -> head(linear, d_out=2)")
