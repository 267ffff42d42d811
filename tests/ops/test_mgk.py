"""mha(mgk) against the Transformer-MGK equation, in float64: a_ij = sum_r pi_r exp(-|q_i - k_jr|^2 / 2 sigma^2) over
its sum across keys (sigma^2 = sqrt(dh), pi the softmax of the mixing logits), o_i = sum_j a_ij v_j, written with the
Gaussians themselves (the squared distances, |q|^2 included), from the projections' weights; one to three
components, grouped and single K/V heads, causal and bidirectional, padding (left: causal and bidirectional).
With r = 1 and keys of one norm it is softmax attention. Decoding: tests/test_decode.py; leaks: tests/ops/test_leaks.py."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl import EvoError, parse
from evodsl.ops import Ctx
from ophelpers import head_projections, make_op, output_projection, perturb_params

D = 32


def reference(m, x, causal, mask=None):
    q, k, v = head_projections(m, x)
    b, n, h, dh = q.shape
    kv, r = k.shape[2], m.r
    g = h // kv
    keys = [k]
    if r > 1:
        extra = (x @ m.k_extra.weight.T + (0 if m.k_extra.bias is None else m.k_extra.bias)).view(b, n, r - 1, kv, dh)
        keys += [extra[:, :, c] for c in range(r - 1)]
    pi = torch.softmax(m.mix_logit, -1)
    sigma2 = math.sqrt(dh)
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        for i in range(n):
            js = [j for j in (range(i + 1) if causal else range(n)) if mask is None or mask[bb, j]] or [i]
            for hh in range(h):
                kh = hh // g
                w = torch.stack([sum(pi[kh, c] * torch.exp(-((q[bb, i, hh] - keys[c][bb, j, kh]) ** 2).sum() / (2 * sigma2))
                                     for c in range(r)) for j in js])
                out[bb, i, hh] = (w / w.sum()) @ v[bb, js, kh]
    return output_projection(m, out.reshape(b, n, h * dh))


CASES = [  # causal, r, n, kv_heads
    (False, 1, 6, None), (True, 1, 9, None), (False, 2, 11, 2), (True, 2, 11, 2), (True, 3, 7, 1), (False, 4, 5, 1),
    (True, 2, 1, None),  # one token
]


@pytest.mark.parametrize("causal, r, n, kv_heads", CASES)
def test_mgk_matches_equation(causal, r, n, kv_heads):
    m, _, _ = make_op("mha", "mgk", d=D, causal=causal, heads=4, kv_heads=kv_heads, components=r)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference(m, x, causal)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_matches_equation(causal, side):
    m, _, _ = make_op("mha", "mgk", d=D, causal=causal, heads=4, kv_heads=2, components=2)
    perturb_params(m)
    n = 8
    mask = torch.arange(n)[None, :] < torch.tensor([[n], [5]])
    mask = mask.flip(1) if side == "left" else mask
    x = torch.randn(2, n, D, dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx(mask=mask)), reference(m, x, causal, mask)
        assert ((y - ref)[mask]).abs().max().item() < 1e-10 * ref.abs().max().item()


def test_one_component_with_keys_of_one_norm_is_softmax_attention():
    """r = 1: exp(-|q - k|^2 / 2 sigma^2) = exp(q.k / sigma^2) exp(-|q|^2 / 2 sigma^2) exp(-|k|^2 / 2 sigma^2); with
    |k| the same for every key the last factor cancels too, leaving softmax(q.k / sqrt(dh)). Keys of one norm: x on
    the orthonormal rows that k_proj maps to the head's unit vectors."""
    m, _, _ = make_op("mha", "mgk", d=D, causal=True, heads=4, components=1)
    s, _, _ = make_op("mha", "softmax", d=D, causal=True, heads=4)
    perturb_params(s)
    m.load_state_dict(s.state_dict(), strict=False)
    with torch.no_grad():
        m.k_proj.weight.copy_(torch.eye(D, dtype=torch.float64) * 1.3)
        m.k_proj.bias.zero_()
        s.k_proj.weight.copy_(m.k_proj.weight)
        s.k_proj.bias.zero_()
        x = torch.zeros(2, 12, D, dtype=torch.float64)
        x[..., ::8] = torch.randn(2, 12, 4, dtype=torch.float64).sign()  # one +-1 a head: |k| = 1.3 everywhere
        x = x + 0.0
        assert (m(x, Ctx()) - s(x, Ctx())).abs().max().item() < 1e-12


def test_refusals():
    with pytest.raises(EvoError, match="dropout"):
        parse("model m = input(features, d=32) -> mha(mgk, heads=4, dropout=0.1)")
    with pytest.raises(EvoError, match="components"):
        parse("model m = input(features, d=32) -> mha(mgk, heads=4, components=0)")


def test_padding_mask_matters():
    """The negative control of tests/test_padding.py with unit-scale padding (its 5x noise keys get ~1e-8 of the
    weight under the Gaussians' -|k|^2 / 2 sigma^2): unmasked, padding changes the shorter sequence's outputs."""
    m, _, _ = make_op("mha", "mgk", d=D, causal=False, heads=4, kv_heads=2, components=2)
    perturb_params(m)
    x = torch.randn(2, 10, D, dtype=torch.float64)
    mask = torch.arange(10)[None, :] < torch.tensor([[10], [4]])
    with torch.no_grad():
        y, unmasked = m(x, Ctx(mask=mask)), m(x, Ctx())
        alone = m(x[1:, :4], Ctx())
        assert (y[1, :4] - alone[0]).abs().max().item() < 1e-12
        assert (unmasked[1, :4] - y[1, :4]).abs().max().item() > 1e-3
