"""mha(retention) against RetNet's parallel form (arXiv:2307.08621 eq. 5-8), in float64: per head, the queries and keys
turned by e^{i n theta} (channel pairs as complex numbers here), o_n = sum_{m<=n} gamma_h^(n-m) (Q_n . K_m / sqrt(dh))
V_m with gamma_h = 1 - 2^(-5-h), GroupNorm per head, the swish gate and W_O, written with loops and complex numbers,
apart from the module's chunked kernel. Its chunked, recurrent and parallel (export) forms agree; bad arguments are
refused with EvoErrors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from evodsl.ops.attention._chunked_linear import parallel_decay
from ophelpers import (assert_decodes_with_constant_state, assert_steps_and_pieces_agree, head_projections, make_op,
                       output_projection, perturb_params, refuses)

D = 32


def turned(x, angles):
    """x [b, n, heads, dh]: channel pairs (2i, 2i+1) as the complex x_2i + i x_2i+1, times e^{i t theta_i}."""
    z = torch.complex(x[..., 0::2], x[..., 1::2])
    t = torch.arange(x.shape[1], dtype=torch.float64)
    z = z * torch.exp(1j * t[None, :, None, None] * angles)
    return torch.stack((z.real, z.imag), -1).flatten(-2)


def reference(m, x, gamma=None, rotate=True):
    q, k, v = head_projections(m, x)
    b, n, h, dh = q.shape
    g, dv = h // k.shape[2], v.shape[-1]  # dv: v_factor dh
    if rotate:
        half = dh // 2
        angles = torch.tensor([10000.0 ** (-i / (half - 1)) if half > 1 else 1.0 for i in range(half)], dtype=torch.float64)
        q, k = turned(q, angles), turned(k, angles)
    out = torch.zeros(b, n, h, dv, dtype=x.dtype)
    for hh in range(h):
        gam = gamma if gamma is not None else 1 - 2.0 ** (-5 - hh)
        for i in range(n):
            for j in range(i + 1):
                w = gam ** (i - j) * torch.einsum("bd,bd->b", q[:, i, hh], k[:, j, hh // g]) / math.sqrt(dh)
                out[:, i, hh] += w[:, None] * v[:, j, hh // g]
    mu, var = out.mean(-1, keepdim=True), out.var(-1, unbiased=False, keepdim=True)
    normed = ((out - mu) / torch.sqrt(var + 1e-5)).reshape(b, n, h * dv) * m.group_norm.weight + m.group_norm.bias
    gate = x @ m.g_proj.weight.T + (0 if m.g_proj.bias is None else m.g_proj.bias)
    return output_projection(m, F.silu(gate) * normed)


CASES = [  # n, build
    (5, {}), (23, {"chunk": 8}), (70, {}), (37, {"kv_heads": 2, "chunk": 16}),
    (19, {"kv_heads": 1, "head_dim": 6, "bias": False, "chunk": 4}), (12, {"gamma": 0.8, "chunk": 5}),
    (17, {"rotate": False, "chunk": 6}), (3, {"chunk": 16}),
    (21, {"v_factor": 2, "kv_heads": 2, "chunk": 8}),  # RetNet's models: values twice as wide as queries
]


@pytest.mark.parametrize("n,build", CASES)
def test_retention_is_the_equation(n, build):
    m, _, _ = make_op("mha", "retention", d=D, causal=True, heads=4, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    want = reference(m, x, build.get("gamma"), build.get("rotate", True))
    assert (m(x, None) - want).abs().max() < 1e-10


@pytest.mark.parametrize("n,build", [CASES[0], CASES[1], CASES[3], CASES[-1]])
def test_forms_agree(n, build):
    """Chunked (the forward), recurrent (one token at a time through the decoding state), chunked from a state (a
    prompt, then pieces) and the parallel form the export runs: equal to 1e-10."""
    m, _, _ = make_op("mha", "retention", d=D, causal=True, heads=4, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = m(x, None)
    assert_steps_and_pieces_agree(m, x, y)
    q, k, v, g, _ = m.features(x, None, 0)
    assert (m.finish(x, parallel_decay(q, k, v, g)) - y).abs().max() < 1e-10


def test_refusals():
    refuses("retention", {"chunk=0": "chunk", "gamma=1.0": "gamma"}, causal=True, ok="chunk=16")
    refuses("retention", {"chunk=16": "causal only"}, causal=False)
    refuses("retention", {"dropout=0.1": "dropout", "head_dim=5": "odd", "kv_heads=3": "kv_heads"}, causal=True)


def test_decoding_state_is_constant():
    """The state is dh x dh a query head. Pieces of several sizes through the cache give the forward (float64); the
    state's bytes equal the cost's kv_cache after 1, 4 and 30 tokens."""
    build = {"heads": 4, "kv_heads": 2}
    m, _, _ = make_op("mha", "retention", d=D, causal=True, **build)
    perturb_params(m)
    nbytes = assert_decodes_with_constant_state(m, "mha", "retention", D, build)
    assert nbytes[0] == 2 * 4 * 8 * 8 * 8  # float64