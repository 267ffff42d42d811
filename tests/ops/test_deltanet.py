"""mha(deltanet) and mha(gated_deltanet) against the delta rule's recurrence (arXiv:2406.06484 eq. 2; arXiv:2412.06464
eq. 10), in float64: per head and token, S_t = a_t (I - beta_t k_t k_t^T) S_(t-1) + beta_t k_t v_t^T, o_t = q_t^T S_t
(a_t = 1 for DeltaNet, exp(-e^A softplus(x W_a + dt_bias)) for Gated DeltaNet), written as a loop over tokens with
the layer's short convolutions as explicit sums over the last K inputs, apart from the module's chunked kernel; then
the RMSNorm per head (gated by swish(x W_g) in Gated DeltaNet) and W_O. Chunked, recurrent and the export's one-piece
forms agree; bad arguments are refused with EvoErrors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evodsl.ops.attention._chunked_delta import parallel_delta
from ophelpers import (assert_decodes_with_constant_state, assert_steps_and_pieces_agree, make_op, output_projection,
                       perturb_params, refuses)

D = 32


def conv(x, weight):
    """x [b, n, c]: y_t = silu(sum_j weight[j] x_(t-K+1+j)), zeros before the first token."""
    K, n = weight.shape[0], x.shape[1]
    y = torch.zeros_like(x)
    for t in range(n):
        for j in range(K):
            s = t - K + 1 + j
            if s >= 0:
                y[:, t] += weight[j] * x[:, s]
    return F.silu(y)


def reference(m, x, gated):
    b, n, _ = x.shape
    h, kv, dh = m.heads, m.kv_heads, m.head_dim

    def lin(layer):
        return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)

    q, k, v = lin(m.q_proj), lin(m.k_proj), lin(m.v_proj)
    if m.convs is not None:
        q, k, v = (conv(t, c.weight) for t, c in zip((q, k, v), m.convs))
    else:
        q, k, v = F.silu(q), F.silu(k), F.silu(v)
    q, k, v = q.view(b, n, h, dh), k.view(b, n, kv, dh), v.view(b, n, kv, dh)
    q = q / q.norm(dim=-1, keepdim=True) / dh ** 0.5
    k = k / k.norm(dim=-1, keepdim=True)
    beta = torch.sigmoid(lin(m.b_proj))  # [b, n, h]
    if gated:
        a = torch.exp(-m.A_log.exp() * F.softplus(x @ m.a_proj.weight.T + m.dt_bias))
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    eye = torch.eye(dh, dtype=x.dtype)
    for bb in range(b):
        for hh in range(h):
            S = torch.zeros(dh, dh, dtype=x.dtype)
            for t in range(n):
                kt, bt = k[bb, t, hh // (h // kv)], beta[bb, t, hh]
                S = (a[bb, t, hh] if gated else 1.0) * (eye - bt * torch.outer(kt, kt)) @ S \
                    + bt * torch.outer(kt, v[bb, t, hh // (h // kv)])
                out[bb, t, hh] = q[bb, t, hh] @ S
    o = (out / torch.sqrt(out.pow(2).mean(-1, keepdim=True) + 1e-5) * m.o_norm.weight).reshape(b, n, h * dh)
    if gated:
        o = F.silu(lin(m.g_proj)) * o
    return output_projection(m, o)


CASES = [  # n, build
    (5, {}), (23, {"chunk": 8}), (37, {"kv_heads": 2, "chunk": 16}), (19, {"kv_heads": 1, "head_dim": 6, "bias": False, "chunk": 4}),
    (12, {"conv": 0, "chunk": 5}), (13, {"conv": 2, "chunk": 16}),
]


@pytest.mark.parametrize("variant", ["deltanet", "gated_deltanet"])
@pytest.mark.parametrize("n,build", CASES)
def test_delta_rule_is_the_recurrence(variant, n, build):
    m, _, _ = make_op("mha", variant, d=D, causal=True, heads=4, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    assert (m(x, None) - reference(m, x, variant == "gated_deltanet")).abs().max() < 1e-10


@pytest.mark.parametrize("variant", ["deltanet", "gated_deltanet"])
@pytest.mark.parametrize("n,build", CASES[1:4])
def test_forms_agree(variant, n, build):
    """Chunked (the forward), recurrent (a token at a time: the state and the convolutions' tails), chunked from a
    state (a prompt, then pieces) and the export's one-piece form: equal to 1e-10."""
    m, _, _ = make_op("mha", variant, d=D, causal=True, heads=4, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = m(x, None)
    assert_steps_and_pieces_agree(m, x, y)
    q, k, v, g, beta = m.features(x, None, 0)
    assert (m.finish(x, parallel_delta(q, k, v, beta, g)) - y).abs().max() < 1e-10


@pytest.mark.parametrize("variant", ["deltanet", "gated_deltanet"])
def test_decoding_state_is_constant(variant):
    """The state (dh x dh a query head) and the three convolutions' last K - 1 inputs. Pieces of several sizes
    through the cache give the forward (float64); the state's bytes equal the cost's kv_cache after 1, 4 and 30
    tokens."""
    build = {"heads": 4, "kv_heads": 2}
    m, _, _ = make_op("mha", variant, d=D, causal=True, **build)
    perturb_params(m)
    nbytes = assert_decodes_with_constant_state(m, "mha", variant, D, build)
    assert nbytes[0] == (2 * 4 * 8 * 8 + 2 * 3 * (32 + 16 + 16)) * 8  # float64


@pytest.mark.parametrize("variant", ["deltanet", "gated_deltanet"])
def test_refusals(variant):
    refuses(variant, {"chunk=0": "chunk", "conv=-1": "conv", "conv=65": "conv"}, causal=True, ok="conv=0")
    refuses(variant, {"chunk=16": "causal only"}, causal=False)
    refuses(variant, {"dropout=0.1": "dropout", "kv_heads=3": "kv_heads"}, causal=True)
