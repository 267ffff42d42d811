"""rnn(hgrn2) against HGRN2's recurrence (arXiv:2404.07904 section 3, fla's HGRN2Attention), in float64, written here
token by token from the module's weights: q = swish(x W_q) / sqrt(e), f = lb + (1 - lb) sigmoid(x W_f), i = x W_i,
per head S_t = diag(f_t) S_(t-1) + (1 - f_t)^T i_t, o_t = q_t S_t, then the RMSNorm over all d channels and W_o.
The chunked form equals it at several chunk sizes (n not a multiple, n below a chunk); the step form equals the
forward piece by piece with a state of constant size; the export's one-piece form is the same map."""
from __future__ import annotations

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from evodsl.ops.attention._chunked_linear import parallel_decay
from ophelpers import (assert_matches_in_float32_and_float64, assert_no_leak, assert_padded_row_alone,
                       assert_steps_and_pieces_agree, decode_in_pieces, make_op, perturb_params)

D = 32


def reference(m, x):
    b, n, _ = x.shape
    H, e, dv, lb = m.H, m.e, m.dv, m.lb
    q = x @ m.q_proj.weight.T
    q = (q * torch.sigmoid(q)).view(b, n, H, e) / e ** 0.5
    f = (lb + (1 - lb) * torch.sigmoid(x @ m.f_proj.weight.T)).view(b, n, H, e)
    i = (x @ m.i_proj.weight.T).view(b, n, H, dv)
    o = torch.zeros(b, n, H, dv, dtype=x.dtype)
    for bb in range(b):
        for h in range(H):
            S = torch.zeros(e, dv, dtype=x.dtype)
            for t in range(n):
                S = torch.diag(f[bb, t, h]) @ S + torch.outer(1 - f[bb, t, h], i[bb, t, h])
                o[bb, t, h] = q[bb, t, h] @ S
    o = o.reshape(b, n, H * dv)
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * m.norm_weight
    return o @ m.o_proj.weight.T


CASES = [  # n, build
    (5, {"heads": 4, "expand": 8}), (23, {"heads": 2, "expand": 6, "chunk": 8}),
    (37, {"heads": 4, "expand": 4, "chunk": 16, "lower_bound": 0.4}), (19, {"expand": 16, "chunk": 5}),
    (3, {"heads": 1, "expand": 3, "chunk": 16, "lower_bound": 0.9}),
]


@pytest.mark.parametrize("n,build", CASES)
def test_hgrn2_is_the_recurrence(n, build):
    m, _, _ = make_op("rnn", "hgrn2", d=D, causal=True, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        want = reference(m, x)
        assert (m(x, Ctx()) - want).abs().max() < 1e-10 * want.abs().max()


@pytest.mark.parametrize("n,build", CASES[:3])
def test_forms_agree(n, build):
    """Chunked (the forward) at other chunk sizes, recurrent (a token at a time through the decoding state), chunked
    from a state (a prompt, then pieces) and the parallel form the export runs: equal to 1e-10."""
    m, _, _ = make_op("rnn", "hgrn2", d=D, causal=True, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        for C in (1, 3, 7, 64):
            m.chunk = C
            assert (m(x, Ctx()) - y).abs().max() < 1e-10
        assert_steps_and_pieces_agree(m, x, y)
        q, k, v, g = m.features(x)
        o = parallel_decay(q, k, v, g).transpose(1, 2).reshape(2, n, D)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + m.eps) * m.norm_weight
        assert (m.o_proj(o) - y).abs().max() < 1e-10


def test_no_leak_and_a_constant_decoding_state():
    """The state is e x d / H a head: the cost's kv_cache, the same after 5 tokens and after 40."""
    from costhelpers import declared

    m, _, _ = make_op("rnn", "hgrn2", d=D, causal=True, heads=2, expand=8, chunk=4)
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda t: m(t, Ctx()), n=20, d=D)
        x = torch.randn(2, 40, D, dtype=torch.float64)
        for t in (5, 40):
            _, state = decode_in_pieces(m, x[:, :t], (1,) * t)
            _, _, cost, ev = declared("rnn", "hgrn2", 2, t, dtype=torch.float64, d=D, causal=True, heads=2, expand=8)
            assert state.nbytes() == ev(cost.cache) == 2 * 2 * 8 * 16 * 8


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_enters_no_state(side):
    m, _, _ = make_op("rnn", "hgrn2", d=D, causal=True, heads=2, expand=8, chunk=4, lower_bound=0.2)
    perturb_params(m)
    assert_padded_row_alone(m, side, d=D)


def test_the_lower_bound_bounds_the_forget_gate():
    """f = lb + (1 - lb) sigmoid(.): the log decay is at least log lb, whatever the input."""
    m, _, _ = make_op("rnn", "hgrn2", d=D, causal=True, heads=2, expand=8, lower_bound=0.75)
    perturb_params(m, scale=5.0)
    _, k, _, g = m.features(torch.randn(2, 9, D, dtype=torch.float64) * 10)
    assert g.min() >= torch.log(torch.tensor(0.75, dtype=torch.float64)) - 1e-12 and (k - (1 - g.exp())).abs().max() < 1e-12


def test_validation():
    base = ("vocab = 50\nd_model = 32\nmodel m(causal={c}) = input(tokens) -> embed(token) -> norm -> "
            "rnn(hgrn2{a}) -> norm -> head(lm)\n")
    evodsl.parse(base.format(c="true", a=", heads=4, expand=8, lower_bound=0.5"))
    with pytest.raises(EvoError, match="causal only"):
        evodsl.parse(base.format(c="false", a=", expand=8"))
    with pytest.raises(EvoError, match="below 1"):
        evodsl.parse(base.format(c="true", a=""))  # d / 128 = 0 heads
    with pytest.raises(EvoError, match="not divisible"):
        evodsl.parse(base.format(c="true", a=", heads=3, expand=8"))
    for bad in ("lower_bound=1.0", "lower_bound=-0.1", "expand=0", "heads=0", "chunk=0"):
        with pytest.raises(EvoError, match=bad.split("=")[0]):
            evodsl.parse(base.format(c="true", a=", " + bad))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_a_gate_that_closes_at_once(dtype):
    """No lower bound (HGRN2's first layer) and forget-gate pre-activations in the hundreds: the chunks decay past
    exp(-0.8 ln(max float)), where the factorisation exp(B_i) exp(-B_j) gives inf and nan, and take the ratios one
    lag at a time; against the float64 recurrence (1e-10 relative in float64, 1e-4 in float32)."""
    m, _, _ = make_op("rnn", "hgrn2", d=D, causal=True, heads=2, expand=8, chunk=16, lower_bound=0.0)
    perturb_params(m)
    with torch.no_grad():
        m.f_proj.weight.mul_(400.0)
    x = torch.randn(2, 40, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert_matches_in_float32_and_float64(m, x, reference, dtype, Ctx())
