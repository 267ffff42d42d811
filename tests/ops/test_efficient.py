"""mha(efficient) against its defining equation, in float64: per head rho_q(Q) (rho_k(K)^T V), with the softmaxes
(queries over channels, keys over positions) or the 1/sqrt(n) scalings written here from their definitions;
padding (the scaling form counts each sequence's own n); dropout and causal use refused."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx, OpEnv, ShapeProblem, lookup
from ophelpers import head_projections, make_op, output_projection, perturb_params

D = 32


def reference_efficient(m, x, norm):
    b, n, _ = x.shape
    h, g, dh = m.heads, m.kv_heads, m.head_dim
    q, k, v = head_projections(m, x)
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for hh in range(h):
        qh, kh, vh = q[:, :, hh], k[:, :, hh // (h // g)], v[:, :, hh // (h // g)]
        if norm == "softmax":
            rq = torch.exp(qh) / torch.exp(qh).sum(-1, keepdim=True)  # each row over its dh channels
            rk = torch.exp(kh) / torch.exp(kh).sum(1, keepdim=True)  # each channel over the n positions
        else:
            rq, rk = qh / math.sqrt(n), kh / math.sqrt(n)
        G = torch.einsum("bjc,bje->bce", rk, vh)  # sum_j rho_k(k_j)_c v_je
        out[:, :, hh] = torch.einsum("bic,bce->bie", rq, G)
    return output_projection(m, out.reshape(b, n, h * dh))


@pytest.mark.parametrize("norm", ["softmax", "scaling"])
@pytest.mark.parametrize("n,kv_heads", [(40, None), (17, 2), (70, 1)])
def test_efficient_matches_equation(norm, n, kv_heads):
    m, _, _ = make_op("mha", "efficient", d=D, heads=4, kv_heads=kv_heads, norm=norm)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference_efficient(m, x, norm)
    assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize("left", [False, True])
def test_scaling_form_pads_with_each_sequence_length(left):
    m, _, _ = make_op("mha", "efficient", d=D, heads=4, norm="scaling")
    perturb_params(m)
    x = torch.randn(2, 12, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    if left:
        mask = mask.flip(1)
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        alone = m(x[1:, mask[1]], Ctx())
    assert (y[1, mask[1]] - alone[0]).abs().max().item() < 1e-10


def test_dropout_and_causal_are_refused():
    op = lookup("mha", "efficient")
    with pytest.raises(ShapeProblem, match="none to drop out"):
        op.shape(op.params(dropout=0.1), OpEnv(in_shapes=(("b", "n", D),)))
    src = "d_model = 32\nmodel m(causal=true) = input(tokens, vocab=11) -> embed(token) -> mha(efficient) -> head(lm)\n"
    with pytest.raises(EvoError, match="E301"):
        evodsl.parse(src)
