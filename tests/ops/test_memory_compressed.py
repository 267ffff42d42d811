"""mha(memory_compressed) against its defining equation, in float64: the slots K~_s = W [k_sK; ..; k_sK+K-1] + b
(zero tokens past n), written here token by token from the convolution weight [C, K, C]; bidirectional, each
query over every slot; causal, query t over the finished slots (sK + K - 1 <= t) and the raw tokens of its own
unfinished slot (floor((t+1)/K) K .. t), built as an explicit key list per query. Left padding is refused;
decoding equals the forward (test_decode.py), the causal form does not leak (test_leaks.py)."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_no_leak, head_projections, make_op, output_projection, perturb_params

D = 32


def compressed(conv, t, K):
    """t [b, n, C] -> [b, ceil(n/K), C]: slot s = sum_j W[:, j] t_{sK+j} + bias, tokens past n zero."""
    b, n, C = t.shape
    W = conv.weight.view(C, K, C)  # [out, token j, in]
    slots = []
    for s in range(-(-n // K)):
        acc = torch.zeros(b, C, dtype=t.dtype) + (0 if conv.bias is None else conv.bias)
        for j in range(K):
            if s * K + j < n:
                acc = acc + torch.einsum("oc,bc->bo", W[:, j], t[:, s * K + j])
        slots.append(acc)
    return torch.stack(slots, 1) if slots else t.new_zeros(b, 0, C)


def reference(m, x, K, causal):
    q, k, v = head_projections(m, x)  # [b, n, h, dh], [b, n, kv, dh]
    b, n, h, dh = q.shape
    kv = k.shape[2]
    g = h // kv
    ks = compressed(m.k_compress, k.reshape(b, n, kv * dh), K).view(b, -1, kv, dh)
    vs = compressed(m.v_compress, v.reshape(b, n, kv * dh), K).view(b, -1, kv, dh)
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for t in range(n):
        if causal:
            u = (t + 1) // K
            keys = torch.cat((ks[:, :u], k[:, u * K:t + 1]), 1)  # finished slots, then the unfinished slot's tokens
            vals = torch.cat((vs[:, :u], v[:, u * K:t + 1]), 1)
        else:
            keys, vals = ks, vs
        for hh in range(h):
            sc = torch.einsum("bd,bjd->bj", q[:, t, hh], keys[:, :, hh // g]) / math.sqrt(dh)
            out[:, t, hh] = torch.einsum("bj,bjd->bd", sc.softmax(-1), vals[:, :, hh // g])
    return output_projection(m, out.reshape(b, n, h * dh))


CASES = [  # causal, K, n, kv_heads
    (False, 3, 12, None), (True, 3, 12, None),  # K divides n
    (False, 3, 17, 2), (True, 3, 17, 2),  # a partial last slot, grouped K/V heads
    (True, 4, 23, 1), (False, 5, 23, 1),
    (True, 1, 9, None),  # K = 1: every slot one token (softmax attention through a linear map)
    (True, 8, 5, 2), (False, 8, 5, None),  # n < K: causal, raw tokens only; bidirectional, one slot
]


@pytest.mark.parametrize("causal, K, n, kv_heads", CASES)
def test_memory_compressed_matches_equation(causal, K, n, kv_heads):
    m, _, _ = make_op("mha", "memory_compressed", d=D, causal=causal, heads=4, kv_heads=kv_heads, k=K)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference(m, x, K, causal)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        if K > 1 and n > K:  # the comparison sees the compression
            assert (y - reference(m, x, K, not causal)).abs().max().item() > 1e-6


def test_one_token_slots_with_identity_convolutions_are_softmax_attention():
    """K = 1 with W = I, b = 0: every slot is its token, and the causal form reads exactly tokens 0 .. t."""
    for causal in (False, True):
        m, _, _ = make_op("mha", "memory_compressed", d=D, causal=causal, heads=4, kv_heads=2, k=1)
        s, _, _ = make_op("mha", "softmax", d=D, causal=causal, heads=4, kv_heads=2)
        perturb_params(s)
        m.load_state_dict(s.state_dict(), strict=False)
        with torch.no_grad():
            for conv in (m.k_compress, m.v_compress):
                conv.weight.copy_(torch.eye(conv.weight.shape[0], dtype=torch.float64))
                conv.bias.zero_()
            x = torch.randn(2, 21, D, dtype=torch.float64)
            assert (m(x, Ctx()) - s(x, Ctx())).abs().max().item() < 1e-12


def test_causal_does_not_leak_and_bidirectional_does():
    m, _, _ = make_op("mha", "memory_compressed", d=D, causal=True, heads=4, kv_heads=2, k=3)
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=25, d=D)
    m, _, _ = make_op("mha", "memory_compressed", d=D, causal=False, heads=4, k=3)
    with torch.no_grad(), pytest.raises(AssertionError, match="changed by"):
        assert_no_leak(lambda x: m(x, Ctx()), n=12, d=D)


@pytest.mark.parametrize("causal", [False, True])
def test_left_padding_is_refused(causal):
    m, _, _ = make_op("mha", "memory_compressed", d=D, causal=causal, heads=4, k=3)
    x = torch.randn(2, 10, D, dtype=torch.float64)
    left = torch.ones(2, 10, dtype=torch.bool)
    left[0, :3] = False
    with pytest.raises(EvoError, match="E409.*right padding"):
        m(x, Ctx(mask=left))


@pytest.mark.parametrize("causal", [False, True])
def test_export_form_equals_forward(causal):
    """The gathered form the export runs (a symbolic n: at least two slots and groups, the extra ones unread) equals
    the forward at every n, below K included, with GQA and (bidirectional) right padding."""
    for K, kv_heads in ((3, None), (4, 2)):
        m, _, _ = make_op("mha", "memory_compressed", d=D, causal=causal, heads=4, kv_heads=kv_heads, k=K)
        perturb_params(m)
        for n in (1, 2, K, K + 1, 12, 17):
            x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
            mask = torch.arange(n)[None, :] < torch.tensor([[n], [max(1, n - 4)]])
            for key_mask in (None,) if causal else (None, mask):
                with torch.no_grad():
                    q = m.q_proj(x).view(2, n, 4, -1).transpose(1, 2)
                    o = m.out(m._gathered(q, m.k_proj(x), m.v_proj(x), key_mask))
                    want = m(x, Ctx(mask=key_mask))
                    real = mask[..., None] if key_mask is not None else 1
                    assert ((o - want) * real).abs().max().item() < 1e-12, (K, n)
