"""mha(isab) against the Set Transformer's equations, in float64: H = MAB(I, X) = LN(H0 + relu(W H0 + b)),
H0 = LN(I + Multihead(I, X, X)), output Multihead(X, H, H), written here with explicit sums over the set; padded
elements take no part (a padded batch equals each set alone: here and in test_padding.py); every output is
permutation-equivariant in the set; no causal form, no dropout."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx, OpEnv, ShapeProblem, lookup
from ophelpers import head_projections, make_op, output_projection, perturb_params

D = 32


def _linear(layer, t):
    return t @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def _layernorm(norm, t):
    mu = t.mean(-1, keepdim=True)
    var = ((t - mu) ** 2).mean(-1, keepdim=True)
    return (t - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _multihead(q, k, v, h, g, keep=None):
    """q [b, Lq, h, dh], k, v [b, Lk, g, dh] -> [b, Lq, h * dh]: softmax(q k^T / sqrt(dh)) v per head."""
    b, lq, _, dh = q.shape
    out = torch.zeros(b, lq, h, dh, dtype=q.dtype)
    for hh in range(h):
        kh = hh // (h // g)
        s = torch.einsum("bid,bjd->bij", q[:, :, hh], k[:, :, kh]) / math.sqrt(dh)
        if keep is not None:
            s = s.masked_fill(~keep[:, None, :], float("-inf"))
        w = torch.exp(s - s.amax(-1, keepdim=True))
        out[:, :, hh] = torch.einsum("bij,bjd->bid", w / w.sum(-1, keepdim=True), v[:, :, kh])
    return out.reshape(b, lq, h * dh)


def reference_isab(m, x, keep=None):
    b, n, _ = x.shape
    h, g, dh = m.heads, m.kv_heads, m.head_dim
    M = m.inducing.shape[0]
    q, k, v = head_projections(m, x)  # the set's queries (second attention), keys and values (first)
    qi = _linear(m.i_q, m.inducing).view(1, M, h, dh).expand(b, M, h, dh)
    h0 = _layernorm(m.norm0, m.inducing + _linear(m.i_o, _multihead(qi, k, v, h, g, keep)))
    hh = _layernorm(m.norm1, h0 + torch.relu(_linear(m.rff, h0)))
    kh, vh = _linear(m.h_k, hh).view(b, M, g, dh), _linear(m.h_v, hh).view(b, M, g, dh)
    return output_projection(m, _multihead(q, kh, vh, h, g))


@pytest.mark.parametrize("n,M,kv_heads,bias", [(40, 8, None, True), (17, 32, 2, True), (9, 3, 1, False),
                                               (64, 16, 2, False)])
def test_isab_matches_equation(n, M, kv_heads, bias):
    m, _, _ = make_op("mha", "isab", d=D, heads=4, kv_heads=kv_heads, m=M, bias=bias)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference_isab(m, x)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))  # a set: order-equivariant
        assert (m(x[:, perm], Ctx()) - y[:, perm]).abs().max().item() < 1e-10 * ref.abs().max().item()
        m.inducing[0, 0] += 1.0  # the inducing points are read
        assert (m(x, Ctx()) - y).abs().max().item() > 1e-6


def test_isab_padding_masks_the_first_attention():
    m, _, _ = make_op("mha", "isab", d=D, heads=4, kv_heads=2, m=6)
    perturb_params(m)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, D, generator=g, dtype=torch.float64)
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[0, 7:] = False
    keep[1, :4] = False  # left padding: a set has no order, so any mask is honoured
    with torch.no_grad():
        y, ref = m(x, Ctx(mask=keep)), reference_isab(m, x, keep)
        assert (y - ref).abs().max().item() < 1e-10 * ref.abs().max().item()
        alone = m(x[1:, 4:], Ctx())
        assert (y[1:, 4:] - alone).abs().max().item() < 1e-10 * ref.abs().max().item()


def test_isab_has_no_causal_form_nor_dropout():
    src = "d_model = 32\nmodel m(causal=true) = input(tokens, vocab=11) -> embed(token) -> mha(isab, m=4) -> head(lm)\n"
    with pytest.raises(EvoError, match="E301"):
        evodsl.parse(src)
    op = lookup("mha", "isab")
    with pytest.raises(ShapeProblem, match="no dropout"):
        op.shape(op.params(m=4, dropout=0.1), OpEnv(in_shapes=(("b", "n", D),)))
