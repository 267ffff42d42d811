"""mha(chunk) against its defining equation, in float64: per head, softmax over the keys of the query's own chunk
of c tokens (chunks counted from position 0; causal: up to the query), written here as a full n x n masked
softmax; with rope and ALiBi inside (rotation and bias from test_local's references). Left padding is refused;
decoding equals the forward (test_decode.py), the causal form does not leak (test_leaks.py)."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_no_leak, make_op, perturb_params
from .test_local import position_bias, project, require_pos

D = 32


def reference_chunk(m, x, c, causal, pos=None):
    """o_t = sum_r softmax_r(q_t.k_r / sqrt(dh) + bias) v_r over floor(r/c) = floor(t/c) (causal: and r <= t)."""
    q, k, v = project(m, x, pos)
    b, h, n, dh = q.shape
    group = h // k.shape[1]
    t, r = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (t // c) == (r // c)
    if causal:
        allowed &= r <= t
    bias = position_bias(pos, h, t, r)
    heads = []
    for hh in range(h):
        s = torch.einsum("bid,bjd->bij", q[:, hh], k[:, hh // group]) / math.sqrt(dh)
        if bias is not None:
            s = s + bias[hh]
        w = torch.exp(s.masked_fill(~allowed, float("-inf")) - s.masked_fill(~allowed, float("-inf")).amax(-1, keepdim=True))
        heads.append(torch.einsum("bij,bjd->bid", w / w.sum(-1, keepdim=True), v[:, hh // group]))
    o = torch.stack(heads, 2).reshape(b, n, h * dh)
    return o @ m.o_proj.weight.T + m.o_proj.bias


CASES = [  # causal, c, n, kv_heads, pos
    (False, 8, 64, None, None),  # whole chunks only
    (True, 8, 64, 2, None),
    (False, 10, 77, 2, None),  # seven chunks and 7 tokens left over
    (True, 10, 77, None, None),
    (True, 16, 9, 1, None),  # n < c: one short chunk
    (False, 1, 13, None, None),  # each token attends only itself
    (True, 7, 50, None, ("rope", {})),
    (False, 7, 50, 2, ("rope", {"fraction": 0.5, "base": 100.0})),
    (True, 7, 50, 2, ("alibi", {})),
    (False, 12, 50, None, ("alibi", {})),
]


@pytest.mark.parametrize("causal, c, n, kv_heads, pos", CASES)
def test_chunk_matches_equation(causal, c, n, kv_heads, pos):
    require_pos(pos)
    m, _, _ = make_op("mha", "chunk", d=D, causal=causal, pos=pos, heads=4, kv_heads=kv_heads, c=c)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference_chunk(m, x, c, causal, pos)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        if 1 < c < n:  # the comparison sees the chunk's edge
            assert (y - reference_chunk(m, x, c + 1, causal, pos)).abs().max().item() > 1e-6
        # the export's form (a symbolic n) computes the same
        assert (m._gathered(*m.qkv(x), None).transpose(1, 2).flatten(2) @ m.o_proj.weight.T + m.o_proj.bias
                - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


def test_chunk_equals_softmax_when_one_chunk_holds_the_sequence():
    for causal in (False, True):
        m, _, _ = make_op("mha", "chunk", d=D, causal=causal, heads=4, kv_heads=2, c=64)
        s, _, _ = make_op("mha", "softmax", d=D, causal=causal, heads=4, kv_heads=2)
        s.load_state_dict(m.state_dict())
        x = torch.randn(2, 40, D, dtype=torch.float64)
        with torch.no_grad():
            assert (m(x, Ctx()) - s(x, Ctx())).abs().max().item() < 1e-12


def test_chunk_causal_does_not_leak_and_bidirectional_does():
    m, _, _ = make_op("mha", "chunk", d=D, causal=True, heads=4, kv_heads=2, c=6)
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=40, d=D)
    m, _, _ = make_op("mha", "chunk", d=D, causal=False, heads=4, c=6)
    with torch.no_grad(), pytest.raises(AssertionError, match="changed by"):
        assert_no_leak(lambda x: m(x, Ctx()), n=20, d=D)


@pytest.mark.parametrize("causal", [False, True])
def test_left_padding_is_refused(causal):
    m, _, _ = make_op("mha", "chunk", d=D, causal=causal, heads=4, c=4)
    x = torch.randn(2, 10, D, dtype=torch.float64)
    left = torch.ones(2, 10, dtype=torch.bool)
    left[0, :3] = False
    with pytest.raises(EvoError, match="E409.*right padding"):
        m(x, Ctx(mask=left))
