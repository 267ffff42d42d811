"""mha(lightning) against Lightning Attention-2's equation in the TransNormerLLM layer (arXiv:2401.04658 eq. 1-4;
arXiv:2307.14995 section 3.2), in float64: per head, o_t = sum_{j<=t} lambda_h^(t-j) (swish(q_t) . swish(k_j)) v_j with
lambda_h = exp(-(8 h / H)(1 - r)), written as a loop over queries apart from the module's tiled kernel; then
SRMSNorm over all heads, times U = X W_U, and W_O. Its tiled, recurrent and one-piece (export) forms agree; bad
arguments are refused with EvoErrors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from evodsl.ops.attention._chunked_linear import parallel_decay
from ophelpers import (assert_decodes_with_constant_state, assert_every_parameter_learns, assert_padded_row_alone,
                       assert_steps_and_pieces_agree, head_projections, make_op, output_projection, perturb_params,
                       refuses)

D = 32


def reference(m, x, depth=0.0, decay=None):
    q, k, v = head_projections(m, x)
    b, n, h, dh = q.shape
    g = h // k.shape[2]
    q, k = F.silu(q), F.silu(k)
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for hh in range(h):
        lam = decay if decay is not None else math.exp(-(8 * (hh + 1) / h) * (1 - depth))
        for t in range(n):
            w = torch.stack([lam ** (t - j) * (q[:, t, hh] * k[:, j, hh // g]).sum(-1) for j in range(t + 1)], 1)
            out[:, t, hh] = torch.einsum("bj,bjd->bd", w, v[:, :t + 1, hh // g])
    o = out.reshape(b, n, h * dh)
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6)
    u = x @ m.u_proj.weight.T + (0 if m.u_proj.bias is None else m.u_proj.bias)
    return output_projection(m, o * u)


CASES = [  # n, build
    (5, {}), (23, {"chunk": 8}), (29, {"depth": 0.9, "chunk": 8}), (37, {"kv_heads": 2, "chunk": 16, "decay": 0.95}),
    (19, {"kv_heads": 1, "head_dim": 6, "bias": False, "chunk": 4, "depth": 0.5}), (3, {"chunk": 16}),
]


@pytest.mark.parametrize("n,build", CASES)
def test_lightning_is_the_equation(n, build):
    m, _, _ = make_op("mha", "lightning", d=D, causal=True, heads=4, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    want = reference(m, x, build.get("depth", 0.0), build.get("decay"))
    assert (m(x, None) - want).abs().max() < 1e-10 * want.abs().max()


@pytest.mark.parametrize("n,build", [CASES[1], CASES[3], CASES[4]])
def test_forms_agree(n, build):
    """Tiled (the forward), recurrent (one token at a time), tiled from a state (a prompt, then pieces) and the
    one-piece form the export runs: equal to 1e-10."""
    m, _, _ = make_op("mha", "lightning", d=D, causal=True, heads=4, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = m(x, None)
    assert_steps_and_pieces_agree(m, x, y)
    q, k, v, g, _ = m.features(x, None, 0)
    assert (m.finish(x, parallel_decay(q, k, v, g)) - y).abs().max() < 1e-10


def test_padding_and_learning():
    m, _, _ = make_op("mha", "lightning", d=D, causal=True, heads=4, chunk=4, depth=0.8)
    perturb_params(m, scale=0.3)
    assert_padded_row_alone(m, "left")
    assert_padded_row_alone(m, "right")
    assert_every_parameter_learns(m)


def test_decoding_state_is_constant():
    """The state is dh x dh a query head. Pieces of several sizes through the cache give the forward (float64); the
    state's bytes equal the cost's kv_cache after 1, 4 and 30 tokens."""
    build = {"heads": 4, "kv_heads": 2}
    m, _, _ = make_op("mha", "lightning", d=D, causal=True, **build)
    perturb_params(m)
    nbytes = assert_decodes_with_constant_state(m, "mha", "lightning", D, build)
    assert nbytes[0] == 2 * 4 * 8 * 8 * 8  # float64


def test_refusals():
    refuses("lightning", {"chunk=0": "chunk", "decay=1.0": "decay", "depth=1.0": "depth"}, causal=True,
            ok="depth=0.5")
    refuses("lightning", {"chunk=16": "causal only"}, causal=False)
    refuses("lightning", {"dropout=0.1": "dropout", "kv_heads=3": "kv_heads"}, causal=True)
