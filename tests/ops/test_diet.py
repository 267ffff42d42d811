"""pos(diet): mha(softmax) with DIET's position attention against a float64 reference from the paper's equation
(a loop over the pairs): A_ij = q_i·k_j / sqrt(dh) + (P_Q^h P_K^h^T)_ij (abs) or + R^h_clamp(i - j, -k, k)
(rel), per head; GQA, n past k (clipped distances), causal, decoding's bias at an offset; left padding and
positions past max_len refused (abs)."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import make_op, perturb_params


def reference(m, x, p, causal):
    b, n, d = x.shape
    h, kv, dh = m.heads, m.kv_heads, m.head_dim
    lin = lambda t, layer: t @ layer.weight.t() + (layer.bias if layer.bias is not None else 0)  # noqa: E731
    q = lin(x, m.q_proj).view(b, n, h, dh)
    key = lin(x, m.k_proj).view(b, n, kv, dh).repeat_interleave(h // kv, dim=2)
    v = lin(x, m.v_proj).view(b, n, kv, dh).repeat_interleave(h // kv, dim=2)
    A = torch.einsum("bihd,bjhd->bhij", q, key) / math.sqrt(dh)
    for i in range(n):
        for j in range(n):
            if p["mode"] == "abs":
                A[:, :, i, j] += (m.pos.p_q[:, i] * m.pos.p_k[:, j]).sum(-1)
            else:
                A[:, :, i, j] += m.pos.r[:, min(max(i - j, -p["k"]), p["k"]) + p["k"]]
    if causal:
        A = A.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("bhij,bjhd->bihd", A.softmax(-1), v).reshape(b, n, h * dh)
    return lin(o, m.o_proj)


POS = [{"mode": "abs", "rank": 3, "max_len": 20}, {"mode": "rel", "k": 4}, {"mode": "rel", "k": 30}]
SHAPES = [(2, 11, 32, 4, {}), (1, 17, 32, 4, {"kv_heads": 2}), (2, 3, 24, 2, {"kv_heads": 1, "bias": False})]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b,n,d,heads,extra", SHAPES)
@pytest.mark.parametrize("p", POS, ids=lambda p: "-".join(f"{k}{v}" for k, v in p.items()))
def test_matches_the_paper(p, b, n, d, heads, extra, causal):
    m, _, _ = make_op("mha", "softmax", d=d, heads=heads, causal=causal, pos=("diet", p), **extra)
    perturb_params(m)
    x = torch.randn(b, n, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        got = m(x, Ctx())
    assert (got - reference(m, x, p, causal)).abs().max().item() < 1e-10


@pytest.mark.parametrize("p", POS[:2], ids=["abs", "rel"])
def test_bias_at_an_offset_is_the_dense_one(p):
    """Decoding asks bias(i, j) for queries start.. against keys 0..: the rows of the dense term."""
    m, _, _ = make_op("mha", "softmax", d=16, heads=2, pos=("diet", p))
    perturb_params(m)
    dense = m.pos.dense(9, "cpu")
    i, j = torch.arange(5, 9)[:, None], torch.arange(9)[None, :]
    assert torch.equal(m.pos.bias(i, j), dense[:, 5:9])


def test_abs_refuses_left_padding_and_positions_past_max_len():
    m, _, _ = make_op("mha", "softmax", d=16, heads=2, pos=("diet", {"mode": "abs", "max_len": 8}))
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    mask = torch.tensor([[True] * 6, [False, False] + [True] * 4])
    with pytest.raises(EvoError, match="E409.*right padding|right padding"):
        m(x, Ctx(mask=mask))
    with pytest.raises(EvoError, match="8 positions"):
        m(torch.randn(1, 9, 16, dtype=torch.float64), Ctx())
