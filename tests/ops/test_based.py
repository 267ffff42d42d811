"""mha(based) against Based's equations (arXiv:2402.18668 sections 3-4), in float64: per head, the linear branch's
weights 1 + s + s^2 / 2 (s = q~_t . k~_j / sqrt(f): phi(q~)^T phi(k~) of the 2nd-order Taylor map) over j <= t,
normalised, plus softmax(q_t . k_j / sqrt(dh)) over the last w keys, written as loops over queries apart from the
module's feature map and kernels; then W_O. Its chunked, recurrent and one-piece (export) forms agree, the decoding
state is constant, a padded row is its own, and bad arguments are refused with EvoErrors."""
from __future__ import annotations

import math

import pytest
import torch

from ophelpers import (assert_every_parameter_learns, assert_padded_row_alone, assert_steps_and_pieces_agree,
                       head_projections, make_op, output_projection, perturb_params, refuses)

D = 32


def reference(m, x, window):
    q, k, v = head_projections(m, x)
    b, n, h, dh = q.shape
    g = h // k.shape[2]
    f = m.f

    def proj(layer, heads):
        return (x @ layer.weight.T + (0 if layer.bias is None else layer.bias)).view(b, n, heads, f)

    fq, fk = proj(m.fq_proj, h), proj(m.fk_proj, k.shape[2])
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for hh in range(h):
        for t in range(n):
            s = torch.einsum("bf,bjf->bj", fq[:, t, hh], fk[:, :t + 1, hh // g]) / math.sqrt(f)
            a = 1 + s + s ** 2 / 2
            lin = torch.einsum("bj,bjd->bd", a, v[:, :t + 1, hh // g]) / a.sum(1, keepdim=True)
            lo = max(0, t - window + 1)
            sc = torch.einsum("bd,bjd->bj", q[:, t, hh], k[:, lo:t + 1, hh // g]) / math.sqrt(dh)
            win = torch.einsum("bj,bjd->bd", sc.softmax(1), v[:, lo:t + 1, hh // g])
            out[:, t, hh] = lin + win
    return output_projection(m, out.reshape(b, n, h * dh))


CASES = [  # n, build
    (5, {}), (23, {"window": 4, "chunk": 8}), (29, {"window": 16, "feature_dim": 4, "chunk": 8}),
    (37, {"kv_heads": 2, "chunk": 16, "window": 40}), (19, {"kv_heads": 1, "head_dim": 6, "bias": False, "chunk": 4,
                                                             "feature_dim": 3, "window": 1}),
    (3, {"chunk": 16, "window": 8}),
]


@pytest.mark.parametrize("n,build", CASES)
def test_based_is_the_equation(n, build):
    m, _, _ = make_op("mha", "based", d=D, causal=True, heads=4, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    want = reference(m, x, build.get("window", 64))
    assert (m(x, None) - want).abs().max() < 1e-10 * want.abs().max()


@pytest.mark.parametrize("n,build", [CASES[1], CASES[3], CASES[4]])
def test_forms_agree(n, build):
    """Chunked (the forward), recurrent (one token at a time), chunked from a state (a prompt, then pieces) and the
    one-piece form of a symbolic n (the export's): equal to 1e-10."""
    from evodsl.ops.attention._feature_linear import normalised

    m, _, _ = make_op("mha", "based", d=D, causal=True, heads=4, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = m(x, None)
    assert_steps_and_pieces_agree(m, x, y)
    fq, fk = torch.rand(2, 4, n, 5, dtype=torch.float64), torch.rand(2, 4, n, 5, dtype=torch.float64)
    v = torch.randn(2, 4, n, 3, dtype=torch.float64)
    assert (normalised(fq, fk, v, symbolic=True)[0] - normalised(fq, fk, v, chunk=7)[0]).abs().max() < 1e-10


def test_decoding_state_is_constant():
    """The linear state (1 + f + f^2) x (dh + 1) a query head and the last w keys and values: the cost's kv_cache,
    the same after w tokens and after 24."""
    from costhelpers import declared
    from evodsl.decode import DecodeState
    from evodsl.ops import Ctx

    m, _, cost, ev = declared("mha", "based", 2, 40, d=D, causal=True, heads=4, kv_heads=2, window=6, feature_dim=3)
    state, x, sizes = DecodeState(), torch.randn(2, 24, D), {}
    for at in range(24):
        m(x[:, at:at + 1], Ctx(cache=state, offset=at))
        sizes[at + 1] = state.nbytes()
    assert sizes[6] == sizes[24] == ev(cost.cache) == (2 * 4 * 13 * 9 + 2 * 2 * 2 * 6 * 8) * 4  # float32


def test_padding_and_learning():
    m, _, _ = make_op("mha", "based", d=D, causal=True, heads=4, window=3, chunk=4, feature_dim=4)
    perturb_params(m, scale=0.3)
    assert_padded_row_alone(m, "left")
    assert_padded_row_alone(m, "right")
    assert_every_parameter_learns(m)


def test_refusals():
    refuses("based", {"chunk=0": "chunk", "feature_dim=0": "feature_dim", "window=0": "window"}, causal=True,
            ok="feature_dim=8, window=16")
    refuses("based", {"window=16": "causal only"}, causal=False)
    refuses("based", {"dropout=0.1": "dropout", "kv_heads=3": "kv_heads"}, causal=True)
