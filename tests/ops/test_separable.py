"""mha(separable) against its defining equation, in float64: c = softmax over the n positions of X W_I, c_v =
sum_i c_i K_i, o = (ReLU(V) * c_v) W_O, per head, written here with explicit exponentials and loops from the
weights; padded tokens get no context score; dropout drops context scores (the same seeded mask); kv_heads,
causal use and position schemes refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import make_op, output_projection, perturb_params

D = 32


def _lin(layer, x):
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def reference_separable(m, x, mask=None, drop=None):
    """`drop` [b, n, h]: a dropout mask (already scaled by 1/(1-p)) applied to the context scores."""
    b, n, _ = x.shape
    h, dh = m.heads, m.head_dim
    s = _lin(m.score, x)  # [b, n, h]
    k, v = _lin(m.k_proj, x).view(b, n, h, dh), _lin(m.v_proj, x).view(b, n, h, dh)
    real = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for hh in range(h):
        e = torch.exp(s[:, :, hh] - s[:, :, hh].max()) * real  # exp of the scores of the real tokens
        c = e / e.sum(1, keepdim=True)  # softmax over the positions
        if drop is not None:
            c = c * drop[:, :, hh]
        cv = torch.einsum("bi,bic->bc", c, k[:, :, hh])  # the context vector
        out[:, :, hh] = torch.clamp(v[:, :, hh], min=0) * cv[:, None, :]
    return output_projection(m, out.reshape(b, n, h * dh))


@pytest.mark.parametrize("n,build", [(40, {}), (17, {"heads": 4}), (70, {"heads": 2, "head_dim": 8, "bias": False}),
                                     (9, {"heads": 8})])
def test_separable_matches_equation(n, build):
    m, _, _ = make_op("mha", "separable", d=D, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference_separable(m, x)
    assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize("left", [False, True])
def test_padding_against_the_masked_equation(left):
    m, _, _ = make_op("mha", "separable", d=D, heads=4)
    perturb_params(m)
    x = torch.randn(3, 15, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mask = torch.arange(15)[None, :] < torch.tensor([[15], [9], [2]])
    if left:
        mask = mask.flip(1)
    with torch.no_grad():
        y, ref = m(x, Ctx(mask=mask)), reference_separable(m, x, mask)
    assert (y - ref).abs().max().item() < 1e-10 * ref.abs().max().item()


def test_dropout_drops_context_scores_in_training():
    m, _, _ = make_op("mha", "separable", d=D, heads=2, dropout=0.3)
    perturb_params(m)
    x = torch.randn(2, 11, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    m.train()
    with torch.no_grad():
        torch.manual_seed(5)
        y = m(x, Ctx())
        torch.manual_seed(5)  # the same draws: dropout of ones of the scores' shape is the mask itself
        drop = F.dropout(torch.ones(2, 11, 2, dtype=torch.float64), 0.3, True)
        ref = reference_separable(m, x, drop=drop)
        assert (drop == 0).any()
        assert (y - ref).abs().max().item() < 1e-10 * ref.abs().max().item()
        m.eval()
        assert not torch.allclose(m(x, Ctx()), y)


@pytest.mark.parametrize("model,code,match", [
    ("mha(separable, kv_heads=2)", "E203", "unknown parameter 'kv_heads'"),
    ("pos(rope) -> mha(separable)", "E", "supports: no positions"),
])
def test_refusals(model, code, match):
    src = f"d_model = 32\nmodel m = input(tokens, vocab=11) -> embed(token) -> {model} -> head(lm)\n"
    with pytest.raises(EvoError, match=match) as e:
        evodsl.parse(src)
    assert code in e.value.render()


def test_causal_is_refused_and_a_kv_heads_binding_does_not_reach_it():
    src = "d_model = 32\nmodel m(causal=true) = input(tokens, vocab=11) -> embed(token) -> mha(separable) -> head(lm)\n"
    with pytest.raises(EvoError, match="E301"):
        evodsl.parse(src)
    src = ("d_model = 32\nheads = 4\nkv_heads = 2\n"
           "model m = input(tokens, vocab=11) -> embed(token) -> mha(separable) -> head(lm)\n")
    graph = evodsl.parse(src)
    assert [c.params.heads for c in graph.calls() if c.op.id == "mha(separable)"] == [4]
