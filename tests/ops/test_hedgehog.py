"""mha(hedgehog) against Hedgehog's equation (arXiv:2402.04347 section 4), in float64: per head, the weights
phi(q_t)^T phi(k_j) with phi(x) = [softmax(x W), softmax(-x W)] over j <= t, normalised, written as a loop over queries
apart from the module's kernel; then W_O. Its chunked, recurrent and one-piece (export) forms agree; bad arguments are
refused with EvoErrors. (The paper's softmax mimicry comes from its distillation loss, training outside the op: not
checked here.)"""
from __future__ import annotations

import pytest
import torch

from ophelpers import (assert_decodes_with_constant_state, assert_every_parameter_learns, assert_padded_row_alone,
                       assert_steps_and_pieces_agree, head_projections, make_op, output_projection, perturb_params,
                       refuses)

D = 32


def phi(x, w):
    """x [b, dh], w [dh, f] -> [b, 2 f], the softmaxes written out."""
    z = x @ w
    e, e2 = torch.exp(z - z.max(-1, keepdim=True).values), torch.exp(-z - (-z).max(-1, keepdim=True).values)
    return torch.cat((e / e.sum(-1, keepdim=True), e2 / e2.sum(-1, keepdim=True)), -1)


def reference(m, x):
    q, k, v = head_projections(m, x)
    b, n, h, dh = q.shape
    g = h // k.shape[2]
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for hh in range(h):
        fk = torch.stack([phi(k[:, j, hh // g], m.k_map[hh // g]) for j in range(n)], 1)  # [b, n, 2f]
        for t in range(n):
            a = torch.einsum("bf,bjf->bj", phi(q[:, t, hh], m.q_map[hh]), fk[:, :t + 1])
            out[:, t, hh] = torch.einsum("bj,bjd->bd", a, v[:, :t + 1, hh // g]) / a.sum(1, keepdim=True)
    return output_projection(m, out.reshape(b, n, h * dh))


CASES = [  # n, build
    (5, {}), (23, {"chunk": 8}), (29, {"feature_dim": 12, "chunk": 8}), (37, {"kv_heads": 2, "chunk": 16, "feature_dim": 5}),
    (19, {"kv_heads": 1, "head_dim": 6, "bias": False, "chunk": 4}), (3, {"chunk": 16}),
]


@pytest.mark.parametrize("n,build", CASES)
def test_hedgehog_is_the_equation(n, build):
    m, _, _ = make_op("mha", "hedgehog", d=D, causal=True, heads=4, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    want = reference(m, x)
    assert (m(x, None) - want).abs().max() < 1e-10 * want.abs().max()


@pytest.mark.parametrize("n,build", [CASES[1], CASES[3], CASES[4]])
def test_forms_agree(n, build):
    """Chunked (the forward), recurrent (one token at a time), chunked from a state (a prompt, then pieces) and the
    one-piece form of a symbolic n (the export's): equal to 1e-10."""
    from evodsl.ops.attention._feature_linear import normalised
    from evodsl.ops.attention.hedgehog import feature_map

    m, _, _ = make_op("mha", "hedgehog", d=D, causal=True, heads=4, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = m(x, None)
    assert_steps_and_pieces_agree(m, x, y)
    q, k, v = m.qkv(x)
    fq, fk, v = feature_map(q, m.q_map), m.expand_kv(feature_map(k, m.k_map)), m.expand_kv(v)
    assert (normalised(fq, fk, v, symbolic=True)[0] - normalised(fq, fk, v, chunk=m.chunk)[0]).abs().max() < 1e-10


def test_padding_and_learning():
    m, _, _ = make_op("mha", "hedgehog", d=D, causal=True, heads=4, chunk=4)
    perturb_params(m, scale=0.3)
    assert_padded_row_alone(m, "left")
    assert_padded_row_alone(m, "right")
    assert_every_parameter_learns(m)


def test_decoding_state_is_constant():
    """The state [S z] (2 f x (dh + 1) a query head). Pieces of several sizes through the cache give the forward
    (float64); the state's bytes equal the cost's kv_cache after 1, 4 and 30 tokens."""
    build = {"heads": 4, "kv_heads": 2, "feature_dim": 5}
    m, _, _ = make_op("mha", "hedgehog", d=D, causal=True, **build)
    perturb_params(m)
    nbytes = assert_decodes_with_constant_state(m, "mha", "hedgehog", D, build)
    assert nbytes[0] == 2 * 4 * 10 * 9 * 8  # float64


def test_refusals():
    refuses("hedgehog", {"chunk=0": "chunk", "feature_dim=0": "feature_dim"}, causal=True, ok="feature_dim=4")
    refuses("hedgehog", {"chunk=16": "causal only"}, causal=False)
    refuses("hedgehog", {"dropout=0.1": "dropout", "kv_heads=3": "kv_heads"}, causal=True)
