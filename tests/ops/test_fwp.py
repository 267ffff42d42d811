"""mha(fwp) against the fast weight programmer's update (arXiv:2102.11174 eq. 29-31 and 37-38), in float64: per head
and token, the DPFP-nu features written index by index (phi_(j, i) = r_i r_(i-j mod 2 dh)), sum-normalised, then
v-bar = W phi(k), W <- W + beta (v - v-bar) phi(k)^T, y = W phi(q), as a loop over tokens apart from the module's
chunked kernel; then W_O. Chunked, recurrent and one-piece (export) forms agree; bad arguments are refused."""
from __future__ import annotations

import pytest
import torch

from evodsl.ops.attention._chunked_delta import parallel_delta
from ophelpers import (assert_decodes_with_constant_state, assert_every_parameter_learns, assert_padded_row_alone,
                       assert_steps_and_pieces_agree, head_projections, make_op, output_projection, perturb_params,
                       refuses)

D = 32


def dpfp(x, nu):
    """x [dh] -> [2 dh nu], index by index, sum-normalised."""
    r = torch.cat((x.clamp_min(0), (-x).clamp_min(0)))
    m = r.shape[0]
    phi = torch.stack([r[i] * r[(i - j) % m] for j in range(1, nu + 1) for i in range(m)])
    return phi / phi.sum()


def reference(m, x, nu):
    q, k, v = head_projections(m, x)
    b, n, h, dh = q.shape
    g = h // k.shape[2]
    beta = torch.sigmoid(x @ m.b_proj.weight.T + (0 if m.b_proj.bias is None else m.b_proj.bias))  # [b, n, h]
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        for hh in range(h):
            W = torch.zeros(dh, 2 * dh * nu, dtype=x.dtype)
            for t in range(n):
                fk, fq = dpfp(k[bb, t, hh // g], nu), dpfp(q[bb, t, hh], nu)
                vbar = W @ fk
                W = W + beta[bb, t, hh] * torch.outer(v[bb, t, hh // g] - vbar, fk)
                out[bb, t, hh] = W @ fq
    return output_projection(m, out.reshape(b, n, h * dh))


CASES = [  # n, build
    (5, {}), (23, {"chunk": 8, "nu": 2}), (40, {"nu": 3, "chunk": 16}), (37, {"kv_heads": 2, "chunk": 16}),
    (19, {"kv_heads": 1, "head_dim": 6, "bias": False, "chunk": 4, "nu": 2}), (3, {"chunk": 16}),
]


@pytest.mark.parametrize("n,build", CASES)
def test_fwp_is_the_update(n, build):
    m, _, _ = make_op("mha", "fwp", d=D, causal=True, heads=4, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    want = reference(m, x, build.get("nu", 1))
    assert (m(x, None) - want).abs().max() < 1e-10 * want.abs().max()


@pytest.mark.parametrize("n,build", [CASES[1], CASES[3], CASES[4]])
def test_forms_agree(n, build):
    """Chunked (the forward), recurrent (a token at a time), chunked from a state (a prompt, then pieces) and the
    export's one-piece form: equal to 1e-10."""
    m, _, _ = make_op("mha", "fwp", d=D, causal=True, heads=4, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = m(x, None)
    assert_steps_and_pieces_agree(m, x, y)
    q, k, v, g, beta = m.features(x, None, 0)
    assert (m.finish(x, parallel_delta(q, k, v, beta, g)) - y).abs().max() < 1e-10


def test_padding_and_learning():
    m, _, _ = make_op("mha", "fwp", d=D, causal=True, heads=4, chunk=4, nu=2)
    perturb_params(m, scale=0.3)
    assert_padded_row_alone(m, "left")
    assert_padded_row_alone(m, "right")
    assert_every_parameter_learns(m)


def test_decoding_state_is_constant():
    """The fast weights (2 dh nu x dh a query head). Pieces of several sizes through the cache give the forward
    (float64); the state's bytes equal the cost's kv_cache after 1, 4 and 30 tokens."""
    build = {"heads": 4, "kv_heads": 2, "nu": 2}
    m, _, _ = make_op("mha", "fwp", d=D, causal=True, **build)
    perturb_params(m)
    nbytes = assert_decodes_with_constant_state(m, "mha", "fwp", D, build)
    assert nbytes[0] == 2 * 4 * 32 * 8 * 8  # float64


def test_refusals():
    refuses("fwp", {"chunk=0": "chunk", "nu=0": "nu", "nu=4": "nu"}, causal=True, ok="nu=3")
    refuses("fwp", {"chunk=16": "causal only"}, causal=False)
    refuses("fwp", {"dropout=0.1": "dropout", "kv_heads=3": "kv_heads"}, causal=True)
