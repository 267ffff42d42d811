"""mha(long_short) against its defining equation, in float64: per query t, one softmax over the r projected keys
LN_G(P^T K) and the window keys LN_L(k_j) of its segment and w // 2 positions either side, P = softmax over
positions of X W^P, written here with explicit loops over queries and LayerNorms from their formula; right
padding equals the sequence alone (test_padding.py), left padding is refused, and it has no causal form."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import head_projections, make_op, output_projection, perturb_params

D = 32


def _layer_norm(t, ln):
    """LayerNorm over the last axis from its formula: (t - mean) / sqrt(var + eps) * g + b."""
    mu = t.mean(-1, keepdim=True)
    var = ((t - mu) ** 2).mean(-1, keepdim=True)
    return (t - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def reference_long_short(m, x, key_mask=None):
    b, n, _ = x.shape
    h, g, dh, w, r = m.heads, m.kv_heads, m.head_dim, m.w, m.r
    q, k, v = head_projections(m, x)  # [b, n, heads, dh]
    logits = (x @ m.dproj.weight.T + (0 if m.dproj.bias is None else m.dproj.bias)).view(b, n, g, r)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, :, None, None], float("-inf"))
    P = torch.exp(logits - logits.amax(1, keepdim=True))
    P = P / P.sum(1, keepdim=True)  # softmax over the positions, per K/V head and column
    kbar = torch.einsum("bjgr,bjgd->brgd", P, k).reshape(b, r, g * dh)
    vbar = torch.einsum("bjgr,bjgd->brgd", P, v).reshape(b, r, g * dh)
    kg, vg = (_layer_norm(t, m.ln_global).view(b, r, g, dh) for t in (kbar, vbar))
    kl, vl = (_layer_norm(t.reshape(b, n, g * dh), m.ln_local).view(b, n, g, dh) for t in (k, v))
    e = w // 2
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for t in range(n):
        c = t // w
        window = [j for j in range(c * w - e, c * w + w + e) if 0 <= j < n]
        for bb in range(b):
            keys = [j for j in window if key_mask is None or key_mask[bb, j]]
            for hh in range(h):
                kh = hh // (h // g)
                K = torch.cat([kg[bb, :, kh], kl[bb, keys, kh]])
                V = torch.cat([vg[bb, :, kh], vl[bb, keys, kh]])
                s = K @ q[bb, t, hh] / math.sqrt(dh)
                a = torch.exp(s - s.max())
                out[bb, t, hh] = (a / a.sum()) @ V
    return output_projection(m, out.reshape(b, n, h * dh))


@pytest.mark.parametrize("n,w,r,kv_heads", [(40, 8, 4, None), (37, 6, 3, 2), (17, 32, 5, 1), (50, 7, 1, None),
                                            (9, 2, 2, 2), (64, 16, 8, None)])
def test_long_short_matches_equation(n, w, r, kv_heads):
    m, _, _ = make_op("mha", "long_short", d=D, heads=4, kv_heads=kv_heads, w=w, r=r)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference_long_short(m, x)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        for part in (m.dproj.weight, m.ln_global.weight, m.ln_local.bias):  # each part is read
            part[0] += 1.0
            assert (m(x, Ctx()) - y).abs().max().item() > 1e-6
            part[0] -= 1.0
    m.train()  # the autograd form is the same computation
    torch.testing.assert_close(m(x, Ctx()), ref, rtol=1e-10, atol=1e-10)


def test_right_padding_against_the_equation():
    m, _, _ = make_op("mha", "long_short", d=D, heads=4, kv_heads=2, w=6, r=3)
    perturb_params(m)
    x = torch.randn(2, 23, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = torch.arange(23)[None, :] < torch.tensor([23, 11])[:, None]
    with torch.no_grad():
        y, ref = m(x, Ctx(mask=mask)), reference_long_short(m, x, mask)
    assert (y - ref)[mask].abs().max().item() < 1e-10 * ref.abs().max().item()


def test_left_padding_is_refused_and_no_causal_form():
    m, _, _ = make_op("mha", "long_short", d=D, heads=4, w=4, r=2)
    left = torch.ones(2, 10, dtype=torch.bool)
    left[0, :3] = False
    with pytest.raises(EvoError, match="E409.*right padding"):
        m(torch.randn(2, 10, D, dtype=torch.float64), Ctx(mask=left))
    src = ("d_model = 32\nmodel m(causal=true) = input(tokens, vocab=11) -> embed(token) "
           "-> mha(long_short, w=8, r=4) -> head(lm)\n")
    with pytest.raises(EvoError, match="E301"):
        evodsl.parse(src)


@pytest.mark.parametrize("n,w,kv_heads", [(37, 6, 2), (5, 8, None), (40, 7, 1)])
def test_the_gathered_export_form_is_the_same_attention(n, w, kv_heads):
    """The form a symbolic n runs (ONNX, torch.export) against the blocked one, with right padding."""
    from evodsl.ops.attention.long_short import _gathered_segments, segment_attention

    g = torch.Generator().manual_seed(n)
    q = torch.randn(2, 4, n, 8, generator=g, dtype=torch.float64)
    kvh = kv_heads or 4
    kl, vl = (torch.randn(2, kvh, n, 8, generator=g, dtype=torch.float64) for _ in range(2))
    kg, vg = (torch.randn(2, kvh, 3, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.arange(n)[None, :] < torch.tensor([n, n // 2 + 1])[:, None]
    for km in (None, mask):
        real = (km if km is not None else mask | True)[:, None, :, None].expand(q.shape)  # padded queries: any
        torch.testing.assert_close(_gathered_segments(q, kl, vl, kg, vg, w, km, 0.0)[real],
                                   segment_attention(q, kl, vl, kg, vg, w, km)[real], rtol=1e-12, atol=1e-12)
