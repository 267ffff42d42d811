"""mha(gla) against gated linear attention's recurrence (arXiv:2312.06635 eq. 3-4 and section 4.4), in float64: per
head and token, alpha_t = sigmoid(x_t W_1 W_2 + b)^(1/16), S_t = diag(alpha_t) S_(t-1) + k_t^T v_t, o_t = q_t S_t / sqrt(dk)
written as a loop over tokens, apart from the module's chunked kernel; then the per-head RMSNorm, the swish output gate
and W_O. Its chunked, recurrent and parallel (export) forms agree; bad arguments are refused with EvoErrors."""
from __future__ import annotations

import pytest
import torch

from evodsl.ops.attention._chunked_linear import parallel_decay
from ophelpers import (assert_decodes_with_constant_state, assert_matches_in_float32_and_float64,
                       assert_steps_and_pieces_agree, head_projections, make_op, output_projection, perturb_params,
                       refuses)

D = 32


def reference(m, x, tau=16.0):
    q, k, v = head_projections(m, x)
    b, n, h, dh = q.shape
    g = h // k.shape[2]
    alpha = torch.sigmoid(x @ m.gk_down.weight.T @ m.gk_up.weight.T + m.gk_up.bias) ** (1 / tau)
    alpha = alpha.view(b, n, h, dh)
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        for hh in range(h):
            S = torch.zeros(dh, dh, dtype=x.dtype)
            for t in range(n):
                S = torch.diag(alpha[bb, t, hh]) @ S + torch.outer(k[bb, t, hh // g], v[bb, t, hh // g])
                out[bb, t, hh] = q[bb, t, hh] @ S / dh ** 0.5
    normed = out / torch.sqrt(out.pow(2).mean(-1, keepdim=True) + 1e-5) * m.g_norm.weight
    gate = x @ m.g_proj.weight.T + (0 if m.g_proj.bias is None else m.g_proj.bias)
    return output_projection(m, torch.nn.functional.silu(gate) * normed.reshape(b, n, h * dh))


CASES = [  # n, build
    (5, {}), (23, {"chunk": 8}), (37, {"kv_heads": 2}), (19, {"kv_heads": 1, "head_dim": 6, "bias": False, "chunk": 4}),
    (12, {"rank": 3, "tau": 4.0, "chunk": 5}), (3, {"chunk": 16}),
]


@pytest.mark.parametrize("n,build", CASES)
def test_gla_is_the_recurrence(n, build):
    m, _, _ = make_op("mha", "gla", d=D, causal=True, heads=4, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    assert (m(x, None) - reference(m, x, build.get("tau", 16.0))).abs().max() < 1e-10


@pytest.mark.parametrize("n,build", CASES[:3])
def test_forms_agree(n, build):
    """Chunked (the forward), recurrent (a token at a time through the decoding state), chunked from a state (a
    prompt, then pieces) and the parallel form the export runs: equal to 1e-10."""
    m, _, _ = make_op("mha", "gla", d=D, causal=True, heads=4, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = m(x, None)
    assert_steps_and_pieces_agree(m, x, y)
    q, k, v, g, _ = m.features(x, None, 0)
    assert (m.finish(x, parallel_decay(q, k, v, g)) - y).abs().max() < 1e-10


def test_decoding_state_is_constant():
    """The state is dh x dh a query head. Pieces of several sizes through the cache give the forward (float64); the
    state's bytes equal the cost's kv_cache after 1, 4 and 30 tokens."""
    build = {"heads": 4, "kv_heads": 2}
    m, _, _ = make_op("mha", "gla", d=D, causal=True, **build)
    perturb_params(m)
    nbytes = assert_decodes_with_constant_state(m, "mha", "gla", D, build)
    assert nbytes[0] == 2 * 4 * 8 * 8 * 8  # float64


def test_refusals():
    refuses("gla", {"chunk=0": "chunk", "tau=0": "tau", "rank=0": "rank"}, causal=True, ok="chunk=16")
    refuses("gla", {"chunk=16": "causal only"}, causal=False)
    refuses("gla", {"dropout=0.1": "dropout", "kv_heads=3": "kv_heads"}, causal=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_a_gate_that_closes_at_once(dtype):
    """Gate pre-activations in the hundreds (channels that forget at once): the chunks decay past exp(-ln(max
    float) / 2), where the factorisation exp(B_i) exp(-B_j) gives inf and nan, and take the ratios one lag at a
    time; against the float64 recurrence (1e-10 relative in float64, 1e-4 in float32)."""
    m, _, _ = make_op("mha", "gla", d=D, causal=True, heads=4, chunk=16)
    perturb_params(m)
    with torch.no_grad():
        m.gk_up.weight.mul_(3000.0)
    x = torch.randn(2, 40, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert_matches_in_float32_and_float64(m, x, reference, dtype)
