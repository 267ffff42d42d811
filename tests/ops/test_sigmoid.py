"""mha(sigmoid) against its defining equation, in float64: o_t = sum_j sigmoid(q_t . k_j / sqrt(dh) + b (+ ALiBi's
-m |t - j|)) v_j over each query's keys (causal: j <= t; padding: real keys only), written as loops over queries,
heads and keys from the projection weights alone. The blocked kernel's own backward (the weights recomputed)
against autograd through that reference; n a multiple of no block, n below one block; the export's dense form;
the closed form of equal scores (b = -log n: every weight 1 / (n + 1)); the validation errors. Decoding equals the
forward (test_decode.py), the causal form does not leak (test_leaks.py)."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from evodsl.ops.attention._sigmoid_kernel import dense_sigmoid_attention
from evodsl.ops.position.alibi import alibi_slopes
from ophelpers import head_projections, make_op, output_projection, perturb_params

D = 32


def reference(m, x, causal, b, alibi=False, key_mask=None):
    q, k, v = head_projections(m, x)  # [b, n, h, dh], [b, n, kv, dh]
    bs, n, h, dh = q.shape
    g = h // k.shape[2]
    slopes = alibi_slopes(h)
    rows = []
    for r in range(bs):
        out = []
        for t in range(n):
            heads = []
            for hh in range(h):
                acc = torch.zeros(dh, dtype=x.dtype)
                for j in range(n):
                    if (causal and j > t) or (key_mask is not None and not key_mask[r, j]):
                        continue
                    s = q[r, t, hh] @ k[r, j, hh // g] / math.sqrt(dh) + b - (slopes[hh] * abs(t - j) if alibi else 0)
                    acc = acc + torch.sigmoid(s) * v[r, j, hh // g]
                heads.append(acc)
            out.append(torch.cat(heads))
        rows.append(torch.stack(out))
    return output_projection(m, torch.stack(rows))


CASES = [  # causal, n, block, kv_heads, extra params
    (False, 13, 4, None, {}), (True, 13, 4, None, {}),  # 4 blocks, the last of 1
    (True, 17, 5, 2, {"seq": 64}), (False, 17, 5, 1, {"score_bias": 0.7}),  # grouped K/V heads, other biases
    (True, 6, 100, 2, {}), (False, 6, 100, None, {}),  # n below one block
    (True, 1, 3, 1, {}), (True, 9, 1, None, {"head_dim": 5}),  # one token; blocks of one, head_dim set
]


@pytest.mark.parametrize("causal, n, block, kv_heads, extra", CASES)
def test_sigmoid_matches_equation_and_its_backward_autograd(causal, n, block, kv_heads, extra):
    m, _, _ = make_op("mha", "sigmoid", d=D, causal=causal, heads=4, kv_heads=kv_heads, block=block, **extra)
    perturb_params(m)
    b = extra.get("score_bias", -math.log(extra.get("seq", 1024)))
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64, requires_grad=True)
    y = m(x, Ctx())
    ref = reference(m, x, causal, b)
    assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    params = [x, *m.parameters()]
    got = torch.autograd.grad((y * w).sum(), params)
    want = torch.autograd.grad((ref * w).sum(), params)
    for gg, ww in zip(got, want):
        assert (gg - ww).abs().max().item() < 1e-10 * max(ww.abs().max().item(), 1.0)


@pytest.mark.parametrize("causal", [False, True])
def test_alibi_on_the_blocks(causal):
    m, _, _ = make_op("mha", "sigmoid", d=D, causal=causal, heads=4, kv_heads=2, block=4, pos=("alibi", {}))
    perturb_params(m)
    x = torch.randn(2, 11, D, dtype=torch.float64, requires_grad=True)
    y = m(x, Ctx())
    ref = reference(m, x, causal, -math.log(1024), alibi=True)
    assert (y - ref).abs().max().item() < 1e-10 * ref.abs().max().item()
    gx, = torch.autograd.grad(y.square().sum(), x)
    rx, = torch.autograd.grad(ref.square().sum(), x)
    assert (gx - rx).abs().max().item() < 1e-10 * rx.abs().max().item()


@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_weigh_zero(causal):
    """Right and left padding: the real outputs are the reference's over real keys (a query with none: 0)."""
    m, _, _ = make_op("mha", "sigmoid", d=D, causal=causal, heads=4, kv_heads=2, block=3)
    perturb_params(m)
    x = torch.randn(2, 10, D, dtype=torch.float64)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 7:] = False
    mask[1, :4] = False
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        ref = reference(m, x, causal, -math.log(1024), key_mask=mask)
        assert ((y - ref) * mask[..., None]).abs().max().item() < 1e-10
        assert torch.isfinite(y).all()
        assert (y[:1, :7] - m(x[:1, :7], Ctx())).abs().max().item() < 1e-10


@pytest.mark.parametrize("causal", [False, True])
def test_export_form_equals_the_kernel(causal):
    m, _, _ = make_op("mha", "sigmoid", d=D, causal=causal, heads=4, kv_heads=2, block=4, pos=("alibi", {}))
    perturb_params(m)
    x = torch.randn(2, 9, D, dtype=torch.float64)
    keep = torch.arange(9)[None, :] < torch.tensor([[9], [6]])
    with torch.no_grad():
        q, k, v = m.qkv(x)
        dense = dense_sigmoid_attention(q, k, v, keep, 1 / math.sqrt(m.head_dim), m.score_bias, causal, 0, m.pos.slopes)
        assert (m.out(dense) - m(x, Ctx(mask=keep))).abs().max().item() < 1e-12


def test_equal_scores_weigh_one_over_n_plus_one():
    """q = 0, b = -log n (seq = n): every weight is sigmoid(-log n) = 1 / (n + 1), so o = n / (n + 1) mean(v), near
    softmax's uniform average (the paper's reason for b)."""
    n = 12
    m, _, _ = make_op("mha", "sigmoid", d=D, heads=4, seq=n, block=5)
    perturb_params(m)
    with torch.no_grad():
        m.q_proj.weight.zero_()
        m.q_proj.bias.zero_()
        x = torch.randn(2, n, D, dtype=torch.float64)
        _, _, v = head_projections(m, x)
        o = (v.mean(1, keepdim=True) * n / (n + 1)).expand(2, n, 4, -1).reshape(2, n, D)
        assert (m(x, Ctx()) - output_projection(m, o)).abs().max().item() < 1e-12


def test_validation():
    base = "d_model = 32\nmodel m(causal=true) = input(features, d=32) -> mha(sigmoid, {}) -> head(linear, d_out=2)\n"
    with pytest.raises(EvoError, match="no dropout"):
        evodsl.parse(base.format("dropout=0.1"))
    for bad in ("block=0", "seq=0", "score_bias=1e9"):
        with pytest.raises(EvoError, match=bad.split("=")[0]):
            evodsl.parse(base.format(bad))
    with pytest.raises(EvoError, match="kv_heads"):
        evodsl.parse(base.format("heads=4, kv_heads=3"))
