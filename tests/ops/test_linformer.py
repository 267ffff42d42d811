"""mha(linformer) against its defining equation, in float64: per head, softmax(Q_i (E K_i)^T / sqrt(dh)) (F V_i)
with E, F the first n columns of the learned [k, max_len] tables, written here with explicit sums; right padding
equals the sequence alone (test_padding.py), left padding and over-long inputs are refused, and it has no
causal form."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx, OpEnv, ShapeProblem, lookup
from ophelpers import head_projections, make_op, output_projection, perturb_params

D = 32


def reference_linformer(m, x):
    b, n, _ = x.shape
    h, g, dh = m.heads, m.kv_heads, m.head_dim
    q, k, v = head_projections(m, x)
    E = m.E[:, :n]
    Fm = E if m.F is None else m.F[:, :n]
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for hh in range(h):
        kh = hh // (h // g)
        kp = torch.einsum("rj,bjd->brd", E, k[:, :, kh])  # (E K_i)_r = sum_j E_rj k_j
        vp = torch.einsum("rj,bjd->brd", Fm, v[:, :, kh])
        s = torch.einsum("bid,brd->bir", q[:, :, hh], kp) / math.sqrt(dh)
        w = torch.exp(s - s.amax(-1, keepdim=True))
        out[:, :, hh] = torch.einsum("bir,brd->bid", w / w.sum(-1, keepdim=True), vp)
    return output_projection(m, out.reshape(b, n, h * dh))


@pytest.mark.parametrize("n,k,kv_heads,share", [(40, 8, None, False), (64, 64, 2, False), (17, 32, 1, True),
                                                (100, 5, None, True)])
def test_linformer_matches_equation(n, k, kv_heads, share):
    m, _, _ = make_op("mha", "linformer", d=D, heads=4, kv_heads=kv_heads, k=k, max_len=128, share_kv=share)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference_linformer(m, x)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        m.E[0, 0] += 1.0  # the table is read: a change to E changes the output
        assert (m(x, Ctx()) - y).abs().max().item() > 1e-6


def test_left_padding_and_long_inputs_are_refused():
    m, _, _ = make_op("mha", "linformer", d=D, heads=4, k=8, max_len=32)
    x = torch.randn(2, 10, D, dtype=torch.float64)
    left = torch.ones(2, 10, dtype=torch.bool)
    left[0, :3] = False
    with pytest.raises(EvoError, match="E409.*right padding"):
        m(x, Ctx(mask=left))
    with pytest.raises(EvoError, match="E410.*max_len=32"):
        m(torch.randn(1, 33, D, dtype=torch.float64), Ctx())
    op = lookup("mha", "linformer")
    with pytest.raises(ShapeProblem, match="k=64 is more than max_len=32"):
        op.shape(op.params(k=64, max_len=32), OpEnv(in_shapes=(("b", "n", D),)))


def test_linformer_has_no_causal_form():
    src = "d_model = 32\nmodel m(causal=true) = input(tokens, vocab=11) -> embed(token) -> mha(linformer, k=8, max_len=64) -> head(lm)\n"
    with pytest.raises(EvoError, match="E301"):
        evodsl.parse(src)
