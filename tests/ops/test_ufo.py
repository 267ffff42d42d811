"""mha(ufo) against its defining equation, in float64: per head XN(Q) XN(K^T V), the l2 norms written here from
their definitions (queries over channels; K^T V over its key axis, each column, or its value axis, each row),
gamma per head in both XNorms; padded keys left out; dropout and causal use refused."""
from __future__ import annotations

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx, OpEnv, ShapeProblem, load_all, lookup
from ophelpers import head_projections, make_op, output_projection, perturb_params

D = 32


def reference_ufo(m, x, kv_axis, mask=None):
    b, n, _ = x.shape
    h, g, dh = m.heads, m.kv_heads, m.head_dim
    q, k, v = head_projections(m, x)
    if mask is not None:
        k = k * mask[:, :, None, None]
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for hh in range(h):
        qh, kh, vh = q[:, :, hh], k[:, :, hh // (h // g)], v[:, :, hh // (h // g)]
        gamma = m.gamma[hh]
        xq = gamma * qh / torch.sqrt((qh ** 2).sum(-1, keepdim=True))  # XN over each query's channels
        G = torch.einsum("bjc,bje->bce", kh, vh)  # K^T V
        axis = 1 if kv_axis == "key" else 2  # G[b, c, e]: over c (each column) or over e (each row)
        xg = gamma * G / torch.sqrt((G ** 2).sum(axis, keepdim=True))
        out[:, :, hh] = torch.einsum("bic,bce->bie", xq, xg)
    return output_projection(m, out.reshape(b, n, h * dh))


@pytest.mark.parametrize("kv_axis", ["key", "value"])
@pytest.mark.parametrize("n,heads,kv_heads", [(40, 4, None), (17, 4, 2), (70, 4, 1), (9, 2, None)])
def test_ufo_matches_equation(kv_axis, n, heads, kv_heads):
    m, _, _ = make_op("mha", "ufo", d=D, heads=heads, kv_heads=kv_heads, kv_axis=kv_axis)
    perturb_params(m)  # gamma too: random per head
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference_ufo(m, x, kv_axis)
    assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


def test_the_axes_differ_and_gamma_scales_by_its_square():
    m, _, _ = make_op("mha", "ufo", d=D, heads=4)
    perturb_params(m)
    x = torch.randn(2, 12, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        assert not torch.allclose(reference_ufo(m, x, "key"), reference_ufo(m, x, "value"))
        base = m(x, Ctx()) - m.o_proj.bias
        m.gamma.mul_(3.0)
        assert torch.allclose(m(x, Ctx()) - m.o_proj.bias, 9.0 * base, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("left", [False, True])
def test_padding_against_the_masked_equation(left):
    m, _, _ = make_op("mha", "ufo", d=D, heads=4, kv_heads=2)
    perturb_params(m)
    x = torch.randn(3, 15, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mask = torch.arange(15)[None, :] < torch.tensor([[15], [9], [2]])
    if left:
        mask = mask.flip(1)
    with torch.no_grad():
        y, ref = m(x, Ctx(mask=mask)), reference_ufo(m, x, "key", mask.to(x.dtype))
    assert (y - ref).abs().max().item() < 1e-10 * ref.abs().max().item()


def test_dropout_and_causal_are_refused():
    load_all()
    op = lookup("mha", "ufo")
    assert op.causal == "no" and op.supports == frozenset() and op.decode is None
    with pytest.raises(ShapeProblem, match="none to drop out"):
        op.shape(op.params(dropout=0.1), OpEnv(in_shapes=(("b", "n", D),)))
    src = "d_model = 32\nmodel m(causal=true) = input(tokens, vocab=11) -> embed(token) -> mha(ufo) -> head(lm)\n"
    with pytest.raises(EvoError, match="E301"):
        evodsl.parse(src)
    src = "d_model = 32\nmodel m = input(tokens, vocab=11) -> embed(token) -> pos(rope) -> mha(ufo) -> head(lm)\n"
    with pytest.raises(EvoError, match="supports: no positions"):
        evodsl.parse(src)
