"""mha(lambda) against its defining equations, in float64: the paper's multi-query lambda layer written from its
pseudocode (content lambda einsum(softmax(keys), values), position lambdas einsum(embeddings, values) with the
[n, m, k, u] relative embeddings E_{nm} spelled out, zero outside the scope r), at several sizes, intra-depths,
K/V groups and scopes (r >= 2n - 1: the paper's global relative embeddings); padding on either side; the shape
rule's refusals; no causal form."""
from __future__ import annotations

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx, OpEnv, ShapeProblem, lookup
from ophelpers import make_op, perturb_params

D = 32


def _linear(layer, x):
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def reference_lambda(m, x):
    """Per K/V group g: lam^c = sum_{m,u} softmax_m(K)[m,:,u] V[m,:,u]^T, lam^p_n = sum_{m,u} E_{nm}[:,u] V[m,:,u]^T,
    y_n^h = (lam^c + lam^p_n)^T q_n^h, with E_{nm} = E[m - n + (r-1)/2] inside the scope and 0 outside."""
    b, n, _ = x.shape
    H, G, K, U, V, r = m.heads, m.kv_heads, m.k, m.u, m.head_dim, m.r
    q = _linear(m.q_proj, x).view(b, n, H, K)
    keys = _linear(m.k_proj, x).view(b, n, G, K, U)
    values = _linear(m.v_proj, x).view(b, n, G, V, U)
    emb = torch.zeros(n, n, K, U, dtype=x.dtype)  # E_{nm}: the relative embedding of m seen from n
    half = (r - 1) // 2
    for i in range(n):
        for j in range(n):
            if abs(j - i) <= half:
                emb[i, j] = m.E[:, j - i + half, :].T
    out = torch.zeros(b, n, H, V, dtype=x.dtype)
    for h in range(H):
        g = h // (H // G)
        kbar = torch.exp(keys[:, :, g]) / torch.exp(keys[:, :, g]).sum(1, keepdim=True)  # over positions m
        content = torch.einsum("bmku,bmvu->bkv", kbar, values[:, :, g])
        position = torch.einsum("nmku,bmvu->bnkv", emb, values[:, :, g])
        out[:, :, h] = torch.einsum("bnk,bkv->bnv", q[:, :, h], content) + torch.einsum("bnk,bnkv->bnv", q[:, :, h],
                                                                                      position)
    return _linear(m.o_proj, out.reshape(b, n, H * V))


CASES = [  # (n, heads, kv_heads, k, u, r)
    (40, 4, 1, 16, 1, 23),  # the paper's multi-query lambdas
    (17, 4, 2, 8, 3, 5),  # K/V groups, intra-depth
    (9, 2, 2, 4, 2, 17),  # r = 2n - 1: the global relative embeddings
    (70, 4, 4, 6, 1, 1),  # one value per key head; scope 1 (the position's own value)
    (33, 8, 1, 5, 2, 41),  # r wider than the sequence, odd sizes
]


@pytest.mark.parametrize("n,heads,kv_heads,k,u,r", CASES)
def test_lambda_matches_equation(n, heads, kv_heads, k, u, r):
    m, _, _ = make_op("mha", "lambda", d=D, heads=heads, kv_heads=kv_heads, k=k, u=u, r=r)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference_lambda(m, x)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        m.E[0, 0, 0] += 1.0  # the position embeddings are read: a change to E changes the output
        assert (m(x, Ctx()) - y).abs().max().item() > 1e-6


@pytest.mark.parametrize("left", [False, True])
def test_padding_either_side_equals_the_sequence_alone(left):
    m, _, _ = make_op("mha", "lambda", d=D, heads=4, k=8, u=2, r=7)
    perturb_params(m)
    x = torch.randn(2, 15, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = torch.ones(2, 15, dtype=torch.bool)
    mask[1, 9:] = False
    if left:
        mask = mask.flip(1)
    with torch.no_grad():
        y, alone = m(x, Ctx(mask=mask)), m(x[1:, mask[1]], Ctx())
        assert (y[1, mask[1]] - alone[0]).abs().max().item() < 1e-10
        assert (m(x, Ctx())[1, mask[1]] - alone[0]).abs().max().item() > 1e-6  # unmasked, padding is read


def test_shape_rule_and_no_causal_form():
    op = lookup("mha", "lambda")
    env = OpEnv(in_shapes=(("b", "n", D),))
    assert op.params().kv_heads == 1  # the paper's multi-query lambdas
    with pytest.raises(ShapeProblem, match="r=6 is even"):
        op.shape(op.params(r=6), env)
    with pytest.raises(ShapeProblem, match="none to drop out"):
        op.shape(op.params(dropout=0.1), env)
    with pytest.raises(ShapeProblem, match="kv_heads"):
        op.shape(op.params(heads=4, kv_heads=3), env)
    src = "d_model = 32\nmodel m(causal=true) = input(tokens, vocab=11) -> embed(token) -> mha(lambda) -> head(lm)\n"
    with pytest.raises(EvoError, match="E301"):
        evodsl.parse(src)
