"""mha(fastformer) against its defining equations, in float64, written here with explicit sums: the global query
q = sum_i alpha_i q_i (alpha = softmax of w_q . q_i / sqrt(dh)), p_i = q * k_i, the global key k = sum_i beta_i p_i,
u_i = k * v_i, o_i = W_r u_i + q_i, then o_proj; dropout and causal use refused."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx, OpEnv, ShapeProblem, lookup
from ophelpers import head_projections, make_op, output_projection, perturb_params

D = 32


def reference_fastformer(m, x):
    b, n, _ = x.shape
    h, g, dh = m.heads, m.kv_heads, m.head_dim
    q, k, v = head_projections(m, x)
    u = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for hh in range(h):
        qh, kh, vh = q[:, :, hh], k[:, :, hh // (h // g)], v[:, :, hh // (h // g)]
        a = torch.exp(torch.einsum("bic,c->bi", qh, m.w_q[hh]) / math.sqrt(dh))
        a = a / a.sum(1, keepdim=True)
        gq = torch.einsum("bi,bic->bc", a, qh)
        p = gq[:, None, :] * kh
        be = torch.exp(torch.einsum("bic,c->bi", p, m.w_k[hh]) / math.sqrt(dh))
        be = be / be.sum(1, keepdim=True)
        gk = torch.einsum("bi,bic->bc", be, p)
        u[:, :, hh] = gk[:, None, :] * vh
    u = u.reshape(b, n, h * dh)
    t = u @ m.transform.weight.T + (0 if m.transform.bias is None else m.transform.bias)
    o = t + q.reshape(b, n, h * dh)
    return output_projection(m, o)


@pytest.mark.parametrize("n,kv_heads,bias", [(40, None, True), (17, 2, False), (70, 1, True)])
def test_fastformer_matches_equation(n, kv_heads, bias):
    m, _, _ = make_op("mha", "fastformer", d=D, heads=4, kv_heads=kv_heads, bias=bias)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference_fastformer(m, x)
    assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


def test_dropout_and_causal_are_refused():
    op = lookup("mha", "fastformer")
    with pytest.raises(ShapeProblem, match="none to drop out"):
        op.shape(op.params(dropout=0.1), OpEnv(in_shapes=(("b", "n", D),)))
    src = "d_model = 32\nmodel m(causal=true) = input(tokens, vocab=11) -> embed(token) -> mha(fastformer) -> head(lm)\n"
    with pytest.raises(EvoError, match="E301"):
        evodsl.parse(src)
