"""mha(gsa) against Gated Slot Attention's recurrence (arXiv:2409.07146 section 3), in float64: per head and token,
alpha_t = sigmoid(x_t W_f)^(1/8) over m slots, K~_t = diag(alpha_t) K~_(t-1) + (1 - alpha_t) k_t^T, V~_t likewise
with v_t, o_t = V~_t^T softmax(K~_t q_t) (swish on q, k, v), written as a loop over tokens apart from the module's
kernels; then RMSNorm(swish(o)) over all heads and W_O. Its chunked, recurrent and parallel (export) forms agree;
bad arguments are refused with EvoErrors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evodsl.ops.attention._chunked_linear import parallel_decay
from evodsl.ops.attention._gsa_kernel import parallel_slot_decay
from ophelpers import (assert_matches_in_float32_and_float64, assert_steps_and_pieces_agree, head_projections,
                       make_op, output_projection, perturb_params, refuses)

D = 32


def reference(m, x, slots, normalizer=8.0):
    q, k, v = (F.silu(t) for t in head_projections(m, x))
    b, n, h, dh = q.shape
    kv = k.shape[2]
    g = h // kv
    alpha = torch.sigmoid(x @ m.f_proj.weight.T).view(b, n, kv, slots) ** (1 / normalizer)
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        for hh in range(h):
            Kt = torch.zeros(slots, dh, dtype=x.dtype)
            Vt = torch.zeros(slots, dh, dtype=x.dtype)
            for t in range(n):
                a = alpha[bb, t, hh // g]
                Kt = torch.diag(a) @ Kt + torch.outer(1 - a, k[bb, t, hh // g])
                Vt = torch.diag(a) @ Vt + torch.outer(1 - a, v[bb, t, hh // g])
                out[bb, t, hh] = Vt.T @ torch.softmax(Kt @ q[bb, t, hh], 0)
    o = F.silu(out).reshape(b, n, h * dh)
    return output_projection(m, o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * m.norm_weight)


CASES = [  # n, build
    (5, {"slots": 4}), (23, {"slots": 6, "chunk": 8}), (37, {"slots": 5, "kv_heads": 2}),
    (19, {"slots": 3, "kv_heads": 1, "head_dim": 6, "bias": False, "chunk": 4}),
    (12, {"slots": 7, "normalizer": 2.0, "chunk": 5}), (3, {"slots": 4, "chunk": 16}),
]


@pytest.mark.parametrize("n,build", CASES)
def test_gsa_is_the_recurrence(n, build):
    m, _, _ = make_op("mha", "gsa", d=D, causal=True, heads=4, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    assert (m(x, None) - reference(m, x, build["slots"], build.get("normalizer", 8.0))).abs().max() < 1e-10


@pytest.mark.parametrize("n,build", CASES[:4])
def test_forms_agree(n, build):
    """Chunked (the forward), recurrent (a token at a time through the decoding state), chunked from a state (a
    prompt, then pieces) and the parallel form the export runs: equal to 1e-10."""
    m, _, _ = make_op("mha", "gsa", d=D, causal=True, heads=4, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = m(x, None)
    assert_steps_and_pieces_agree(m, x, y)
    q, k, v, s, g = m.features(x)
    assert (m.finish(parallel_decay(parallel_slot_decay(q, k, s, g).softmax(-1), s, v, g)) - y).abs().max() < 1e-10


def test_decoding_state_is_constant():
    """The state is m x (dk + dv) a query head: the cost's kv_cache, the same after 5 tokens and after 40."""
    from costhelpers import declared
    from evodsl.decode import DecodeState
    from evodsl.ops import Ctx

    m, _, cost, ev = declared("mha", "gsa", 2, 5, d=D, causal=True, heads=4, kv_heads=2, slots=6)
    state, x, sizes = DecodeState(), torch.randn(2, 40, D), {}
    for at in range(40):
        m(x[:, at:at + 1], Ctx(cache=state, offset=at))
        sizes[at + 1] = state.nbytes()
    assert sizes[5] == sizes[40] == ev(cost.cache) == 2 * 4 * 6 * (8 + 8) * 4  # float32


def test_refusals():
    refuses("gsa", {"chunk=0": "chunk", "slots=0": "slots", "normalizer=0": "normalizer"}, causal=True, ok="slots=8")
    refuses("gsa", {"slots=8": "causal only"}, causal=False)
    refuses("gsa", {"dropout=0.1": "dropout", "kv_heads=3": "kv_heads"}, causal=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_a_gate_that_closes_at_once(dtype):
    """Gate pre-activations in the hundreds (slots that forget at once, or keep all): both passes' chunks decay
    past exp(-0.8 ln(max float)), where the factorisation exp(B_i) exp(-B_j) gives inf and nan, and take the ratios
    one lag at a time; against the float64 recurrence (1e-10 relative in float64, 1e-4 in float32)."""
    m, _, _ = make_op("mha", "gsa", d=D, causal=True, heads=4, slots=5, chunk=16)
    perturb_params(m)
    with torch.no_grad():
        m.f_proj.weight.mul_(400.0)
    x = torch.randn(2, 40, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert_matches_in_float32_and_float64(m, x, lambda m, x: reference(m, x, 5), dtype)
