"""mha(differential) against the Differential Transformer's equations, in float64: per head, the two halves of
the query and key channels (query channels [2 i dh, 2 i dh + dh) and the next dh, likewise the key's of its K/V
head), two softmax maps written as loops over queries, their difference with lambda = exp(lq1.lk1) - exp(lq2.lk2)
+ lambda_init, times the head's 2 dh value channels, RMSNorm over the head, times 1 - lambda_init; ALiBi's
-m |t - j| added to both maps. Padding equals each sequence alone; the validation errors; decoding and leaks
run in tests/test_decode.py and tests/ops/test_leaks.py."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from evodsl.ops.position.alibi import alibi_slopes
from ophelpers import assert_no_leak, make_op, output_projection, perturb_params

D = 32


def linear(layer, x):
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def reference(m, x, h, kv, causal, lam_init, alibi=False, key_mask=None):
    b, n, _ = x.shape
    dh = m.head_dim
    g = h // kv
    q, k, v = linear(m.q_proj, x), linear(m.k_proj, x), linear(m.v_proj, x)
    lam = (math.exp((m.lambda_q1 * m.lambda_k1).sum().item()) - math.exp((m.lambda_q2 * m.lambda_k2).sum().item())
           + lam_init)
    slopes = alibi_slopes(h)
    heads = []
    for i in range(h):
        c = i // g  # the head's K/V head
        q1, q2 = q[..., 2 * i * dh:(2 * i + 1) * dh], q[..., (2 * i + 1) * dh:(2 * i + 2) * dh]
        k1, k2 = k[..., 2 * c * dh:(2 * c + 1) * dh], k[..., (2 * c + 1) * dh:(2 * c + 2) * dh]
        vv = v[..., 2 * c * dh:(2 * c + 2) * dh]
        out = torch.zeros(b, n, 2 * dh, dtype=x.dtype)
        for t in range(n):
            keys = [j for j in range(n) if (j <= t or not causal)]
            for r in range(b):
                ks = [j for j in keys if key_mask is None or key_mask[r, j]]
                if not ks:  # a padded query before every token (left padding): cut
                    continue
                idx = torch.tensor(ks)
                bias = torch.tensor([-slopes[i] * abs(t - j) for j in ks], dtype=x.dtype) if alibi else 0
                a1 = ((k1[r, idx] @ q1[r, t]) / math.sqrt(dh) + bias).softmax(-1)
                a2 = ((k2[r, idx] @ q2[r, t]) / math.sqrt(dh) + bias).softmax(-1)
                out[r, t] = (a1 - lam * a2) @ vv[r, idx]
        rms = out.square().mean(-1, keepdim=True).add(1e-5).sqrt()
        heads.append(out / rms * m.norm.weight * (1 - lam_init))
    return output_projection(m, torch.cat(heads, -1))


CASES = [  # causal, n, heads, kv_heads, head_dim, layer
    (False, 9, 2, None, None, 1), (True, 9, 2, None, None, 1),
    (True, 17, 4, 2, None, 3), (False, 17, 4, 1, None, 5),  # grouped K/V heads, deeper layers
    (True, 1, 2, None, None, 2), (False, 1, 2, 2, None, 1),  # one token
    (True, 12, 4, 4, 6, 12), (False, 12, 2, 1, 5, 1),  # head_dim set (2 h dh != d)
]


@pytest.mark.parametrize("causal, n, heads, kv_heads, head_dim, layer", CASES)
def test_differential_matches_equation(causal, n, heads, kv_heads, head_dim, layer):
    m, p, _ = make_op("mha", "differential", d=D, causal=causal, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                      layer=layer)
    perturb_params(m)
    assert m.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * (layer - 1)))
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference(m, x, heads, kv_heads or heads, causal, m.lambda_init)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize("causal", [False, True])
def test_alibi_adds_one_slope_per_head_to_both_maps(causal):
    m, _, _ = make_op("mha", "differential", d=D, causal=causal, heads=4, kv_heads=2, pos=("alibi", {}),
                      lambda_init=0.5)
    perturb_params(m)
    x = torch.randn(2, 13, D, dtype=torch.float64)
    with torch.no_grad():
        ref = reference(m, x, 4, 2, causal, 0.5, alibi=True)
        assert (m(x, Ctx()) - ref).abs().max().item() < 1e-10 * ref.abs().max().item()


@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_get_no_weight_in_either_map(causal):
    m, _, _ = make_op("mha", "differential", d=D, causal=causal, heads=2, kv_heads=1)
    perturb_params(m)
    x = torch.randn(2, 11, D, dtype=torch.float64)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, 8:] = False  # right padding
    mask[1, :3] = False  # left padding
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        ref = reference(m, x, 2, 1, causal, m.lambda_init, key_mask=mask)
        real = mask[..., None]
        assert ((y - ref) * real).abs().max().item() < 1e-10  # padded queries' outputs are cut
        alone = m(x[:1, :8], Ctx())
        assert (y[:1, :8] - alone).abs().max().item() < 1e-10


def test_zero_second_queries_subtract_lambda_times_the_running_mean():
    """Q2 = 0: the second map is uniform over each query's keys, so A V = softmax(Q1 K1^T / sqrt(dh)) V - lambda *
    (the mean of v over j <= t): SDPA of the first map against a cumulative mean, computed apart."""
    m, _, _ = make_op("mha", "differential", d=D, causal=True, heads=2, layer=4)
    perturb_params(m)
    with torch.no_grad():
        m.q_proj.weight.view(2, 2, -1, D)[:, 1] = 0
        m.q_proj.bias.view(2, 2, -1)[:, 1] = 0
        x = torch.randn(2, 10, D, dtype=torch.float64)
        q, k, v = m.project(x)
        mean = v.cumsum(2) / torch.arange(1, 11, dtype=x.dtype)[:, None]
        o = torch.nn.functional.scaled_dot_product_attention(q[:, 0::2], k[:, 0::2], v, is_causal=True) - m.lam() * mean
        want = m.out(m.norm(o) * (1 - m.lambda_init))
        assert (m(x, Ctx()) - want).abs().max().item() < 1e-10


def test_causal_does_not_leak():
    m, _, _ = make_op("mha", "differential", d=D, causal=True, heads=4, kv_heads=2, pos=("rope", {}))
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=20, d=D)


def test_validation():
    base = "d_model = 32\nmodel m(causal=true) = input(features, d=32) -> mha(differential, {}) -> head(linear, d_out=2)\n"
    with pytest.raises(EvoError, match="not divisible by 2 \\* heads = 64"):
        evodsl.parse(base.format("heads=32"))
    with pytest.raises(EvoError, match="no dropout"):
        evodsl.parse(base.format("heads=2, dropout=0.1"))
    with pytest.raises(EvoError, match="lambda_init"):
        evodsl.parse(base.format("heads=2, lambda_init=1.5"))
    with pytest.raises(EvoError, match="layer"):
        evodsl.parse(base.format("heads=2, layer=0"))
    with pytest.raises(EvoError, match="kv_heads"):
        evodsl.parse(base.format("heads=4, kv_heads=3"))
    evodsl.parse(base.format("heads=3, head_dim=4"))  # head_dim set: any heads
