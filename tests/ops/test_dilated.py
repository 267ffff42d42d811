"""mha(dilated) against the patterns of Transformer on a Diet, in float64: the key sets written here as the
authors' mask builders build them (a loop from each query back in steps of the dilation, k keys; dilated_mem the
union of the masks of layers 0 .. l; cascade a window of w m^l), then per query and head an explicit softmax over
its keys. Bidirectional: the sets mirrored. Left padding, GQA, odd sizes; decoding equals the forward
(test_decode.py), the causal form does not leak (test_leaks.py)."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_no_leak, head_projections, make_op, output_projection, perturb_params

D = 32


def diet_mask(n, pattern, layer, k, base, window):
    """bool [n, n]: query i reads key j (causal), as transformer_model.py's loops mark it."""
    mask = torch.zeros(n, n, dtype=torch.bool)
    if pattern == "cascade":
        w = window * base ** layer
        for i in range(n):
            mask[i, max(0, i - w + 1):i + 1] = True
        return mask
    for ll in ([layer] if pattern == "dilated" else range(layer + 1)):
        d = base ** ll
        for i in range(n):
            j = i
            mask[i, j] = True
            for _ in range(k - 1):
                j -= d
                if j < 0:
                    break
                mask[i, j] = True
    return mask


def reference(m, x, mask, key_mask=None):
    q, k, v = head_projections(m, x)  # [b, n, h, dh], [b, n, kv, dh]
    b, n, h, dh = q.shape
    g = h // k.shape[2]
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        for t in range(n):
            keys = [j for j in range(n) if mask[t, j] and (key_mask is None or key_mask[bb, j])] or [t]
            for hh in range(h):
                sc = torch.stack([q[bb, t, hh] @ k[bb, j, hh // g] for j in keys]) / math.sqrt(dh)
                out[bb, t, hh] = torch.einsum("j,jd->d", sc.softmax(-1), v[bb, keys, hh // g])
    return output_projection(m, out.reshape(b, n, h * dh))


CASES = [  # pattern, layer, k, base, window, n, kv_heads
    ("dilated", 0, 3, 2, 1, 13, None), ("dilated", 2, 3, 2, 1, 23, 2), ("dilated", 3, 4, 2, 1, 17, 1),
    ("dilated", 1, 2, 3, 1, 11, None),
    ("dilated_mem", 2, 3, 2, 1, 21, None), ("dilated_mem", 3, 2, 2, 1, 19, 2), ("dilated_mem", 0, 3, 2, 1, 9, 1),
    ("cascade", 0, 3, 2, 1, 7, None), ("cascade", 2, 3, 2, 2, 19, 2), ("cascade", 1, 3, 3, 3, 13, 1),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pattern, layer, k, base, window, n, kv_heads", CASES)
def test_dilated_matches_the_authors_masks(pattern, layer, k, base, window, n, kv_heads, causal):
    m, _, _ = make_op("mha", "dilated", d=D, causal=causal, heads=4, kv_heads=kv_heads, pattern=pattern,
                      layer=layer, k=k, base=base, window=window)
    perturb_params(m)
    mask = diet_mask(n, pattern, layer, k, base, window)
    if not causal:
        mask = mask | mask.T
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference(m, x, mask)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        # the control: full causal (or bidirectional) attention differs wherever the pattern leaves keys out
        full = torch.ones(n, n, dtype=torch.bool).tril() if causal else torch.ones(n, n, dtype=torch.bool)
        assert (y - reference(m, x, full)).abs().max().item() > 1e-6


@pytest.mark.parametrize("causal", [True, False])
def test_padding_either_side(causal):
    """Padded keys left out of every query's set; a query with none left (left padding) reads its own."""
    n = 15
    m, _, _ = make_op("mha", "dilated", d=D, causal=causal, heads=4, kv_heads=2, pattern="dilated_mem", layer=2)
    perturb_params(m)
    key_mask = torch.ones(3, n, dtype=torch.bool)
    key_mask[0, :4] = False
    key_mask[1, 11:] = False
    mask = diet_mask(n, "dilated_mem", 2, 3, 2, 1)
    mask = mask if causal else mask | mask.T
    x = torch.randn(3, n, D, dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx(mask=key_mask)), reference(m, x, mask, key_mask)
        real = key_mask[..., None]
        assert ((y - ref) * real).abs().max().item() < 1e-10 * ref.abs().max().item()


def test_layer_zero_cascade_of_one_is_each_token_alone_and_wide_window_is_softmax():
    """cascade with a window of 1 at layer 0: every query reads only its own key (o_t = W_o v_t); a window past
    the sequence: causal softmax attention."""
    m, _, _ = make_op("mha", "dilated", d=D, causal=True, heads=4, pattern="cascade", window=1)
    s, _, _ = make_op("mha", "softmax", d=D, causal=True, heads=4)
    perturb_params(s)
    m.load_state_dict(s.state_dict())
    x = torch.randn(2, 9, D, dtype=torch.float64)
    with torch.no_grad():
        _, _, v = head_projections(m, x)
        assert (m(x, Ctx()) - output_projection(m, v.reshape(2, 9, -1))).abs().max().item() < 1e-12
        wide, _, _ = make_op("mha", "dilated", d=D, causal=True, heads=4, pattern="cascade", window=4, layer=2)
        wide.load_state_dict(s.state_dict())
        assert (wide(x, Ctx()) - s(x, Ctx())).abs().max().item() < 1e-12


def test_causal_does_not_leak():
    m, _, _ = make_op("mha", "dilated", d=D, causal=True, heads=4, kv_heads=2, pattern="dilated_mem", layer=3)
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=25, d=D)


def test_a_cascade_window_past_65536_keys_is_refused():
    with pytest.raises(EvoError, match="window w m\\^l = 4 \\* 16\\^4 is over 65536"):
        evodsl.parse("model m(causal=true) = input(features, d=32) -> mha(dilated, pattern=cascade, window=4, base=16, "
                     "layer=4, heads=4) -> head(linear, d_out=2)")
