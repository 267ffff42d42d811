"""mha(el) against its defining equation, in float64: per head, the folded matrix W_1 = W_Q^h W_K^g^T applied as
S = (X W_Q^h^T + b_Q^h) W_K^g X^T / sqrt(dh) (queries against the hidden states themselves), softmax (masked after
the query when causal), O = softmax(S) X W_V^g^T + b_V^g, concatenated and o_proj, written here with einsums over
the weights; and against mha(softmax) with the same weights (EL-attention is lossless): causal and not, grouped K/V
heads, padding. Its decoding cache holds X alone: half of mha(softmax)'s K and V at kv_heads = heads."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_no_leak, decode_in_pieces, make_op, output_projection, perturb_params

D = 32


def reference(m, x, causal, key_mask=None):
    b, n, d = x.shape
    h, kv, dh = m.heads, m.kv_heads, m.head_dim
    g = h // kv
    wq, wk, wv = (layer.weight.view(-1, dh, d) for layer in (m.q_proj, m.k_proj, m.v_proj))  # [heads, dh, d]
    bq = m.q_proj.bias.view(h, dh) if m.q_proj.bias is not None else torch.zeros(h, dh, dtype=x.dtype)
    bv = m.v_proj.bias.view(kv, dh) if m.v_proj.bias is not None else torch.zeros(kv, dh, dtype=x.dtype)
    outs = []
    for hh in range(h):
        w1 = wq[hh].T @ wk[hh // g]  # [d, d]: W_Q^h W_K^g^T (row-vector convention)
        s = (torch.einsum("bnd,de,bme->bnm", x, w1, x) + torch.einsum("e,ed,bmd->bm", bq[hh], wk[hh // g], x)[:, None]
             ) / math.sqrt(dh)
        keep = torch.ones(n, n, dtype=torch.bool)
        if causal:
            keep = torch.tril(keep)
        keep = keep[None] if key_mask is None else keep[None] & key_mask[:, None, :]
        a = s.masked_fill(~keep, float("-inf")).softmax(-1)
        outs.append(torch.einsum("bnm,bmd,ed->bne", a, x, wv[hh // g]) + bv[hh // g])
    return output_projection(m, torch.cat(outs, -1))


CASES = [  # causal, n, kv_heads, bias, head_dim
    (False, 11, None, True, None), (True, 11, None, True, None),
    (False, 17, 2, True, None), (True, 17, 2, False, None),  # grouped K/V heads
    (True, 9, 1, True, 12), (False, 6, 1, False, 4),  # multi-query, head_dim set (wider and narrower than d / h)
    (True, 1, 2, True, None), (False, 1, None, True, None),  # one token
]


@pytest.mark.parametrize("causal, n, kv_heads, bias, head_dim", CASES)
def test_el_matches_equation_and_softmax(causal, n, kv_heads, bias, head_dim):
    m, _, _ = make_op("mha", "el", d=D, causal=causal, heads=4, kv_heads=kv_heads, bias=bias, head_dim=head_dim)
    perturb_params(m)
    s, _, _ = make_op("mha", "softmax", d=D, causal=causal, heads=4, kv_heads=kv_heads, bias=bias, head_dim=head_dim)
    s.load_state_dict(m.state_dict())  # the same parameters, the same names
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference(m, x, causal)
        scale = max(ref.abs().max().item(), 1.0)
        assert (y - ref).abs().max().item() < 1e-10 * scale
        assert (y - s(x, Ctx())).abs().max().item() < 1e-10 * scale  # lossless: mha(softmax) with these weights
        if n > 1:  # the check sees the mask
            assert (y - reference(m, x, not causal)).abs().max().item() > 1e-6


def test_key_bias_changes_nothing():
    """b_K adds q_h . b_K to every score of a row: the softmax drops it (EL never uses b_K)."""
    m, _, _ = make_op("mha", "el", d=D, heads=4, kv_heads=2)
    perturb_params(m)
    x = torch.randn(2, 13, D, dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        m.k_proj.bias.add_(torch.randn_like(m.k_proj.bias) * 5)
        assert (m(x, Ctx()) - y).abs().max().item() < 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_padding_equals_softmax_and_the_equation(causal):
    m, _, _ = make_op("mha", "el", d=D, causal=causal, heads=4, kv_heads=2)
    perturb_params(m)
    s, _, _ = make_op("mha", "softmax", d=D, causal=causal, heads=4, kv_heads=2)
    s.load_state_dict(m.state_dict())
    x = torch.randn(2, 10, D, dtype=torch.float64)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 7:] = False  # right padding
    mask[1, :3] = False  # left padding
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        assert (y[0, :7] - reference(m, x[:1, :7], causal)[0]).abs().max().item() < 1e-10
        assert (y[1, 3:] - reference(m, x[1:, 3:], causal)[0]).abs().max().item() < 1e-10
        assert ((y - s(x, Ctx(mask=mask))) * mask[..., None]).abs().max().item() < 1e-10


def test_causal_does_not_leak_and_decodes_from_x_alone():
    m, _, _ = make_op("mha", "el", d=D, causal=True, heads=4, kv_heads=2)
    perturb_params(m)
    x = torch.randn(2, 23, D, dtype=torch.float64)
    with torch.no_grad():
        assert_no_leak(lambda t: m(t, Ctx()), n=23, d=D)
        y, state = decode_in_pieces(m, x, (5, 1, 3, 1, 13))
        assert (y - m(x, Ctx())).abs().max().item() < 1e-10
    (cache,) = state.caches.values()
    assert cache.shape == (2, 23, D) and (cache == x).all()  # X itself: no K, no V


def test_kv_cache_is_x_alone():
    """`evodsl cost`'s kv_cache: b n d per layer, half of mha(softmax)'s K and V at kv_heads = heads, equal at
    kv_heads = heads / 2."""
    spec = "d_model = 64\nmodel m(causal=true) = input(tokens, vocab=50) -> embed -> mha({}) -> head(lm)\n"

    def cache(call):
        return evodsl.cost(spec.format(call), seq=100, batch=2, dtype="float32")["memory"]["kv_cache"]

    assert cache("el, heads=4") == 2 * 100 * 64 * 4
    assert cache("softmax, heads=4") == 2 * cache("el, heads=4")
    assert cache("softmax, heads=4, kv_heads=2") == cache("el, heads=4, kv_heads=2")


def test_validation():
    base = "d_model = 32\nmodel m(causal=true) = input(features, d=32) -> {} -> head(linear, d_out=2)\n"
    with pytest.raises(EvoError, match="no dropout"):
        evodsl.parse(base.format("mha(el, dropout=0.1)"))
    with pytest.raises(EvoError, match="kv_heads"):
        evodsl.parse(base.format("mha(el, heads=4, kv_heads=3)"))
    with pytest.raises(EvoError, match="rope"):
        evodsl.parse(base.format("pos(rope) -> mha(el)"))
