"""rnn(rwkv7) against the paper's recurrence (Peng et al. 2025, Section 4; the authors' x070 code), in float64,
written here token by token from the module's weights: the token shift's lerps, w_t = exp(-e^-0.5 sigmoid(w0 +
tanh(x_w W_1) W_2)), a_t = sigmoid(a0 + x_a A_1 A_2), kh = normalise(k k_k), k' = k (1 + (a - 1) k_a), per head
S_t = S_{t-1} (diag(w_t) - kh_t^T (a_t kh_t)) + v_t^T k'_t and o_t = S_t r_t, GroupNorm per head plus the bonus,
the LoRA gate, W_o. The chunked kernel equals its token recurrence (1e-10) at several n and chunk sizes; the step
form equals the forward piece by piece with a constant state; padding enters no state."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from evodsl.ops.rnn._dplr import chunked_dplr, recurrent_dplr
from ophelpers import (assert_decodes_with_constant_state, assert_padded_row_alone, make_op,
                       perturb_params)

D = 16
SMALL = {"head_size": 4, "decay_rank": 3, "a_rank": 5, "gate_rank": 6}


def reference(m, x):
    b, n, d = x.shape
    H, N = m.H, m.N
    prev = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), 1)
    xr, xw, xk, xv, xa, xg = [x + (prev - x) * mu for mu in (m.x_r, m.x_w, m.x_k, m.x_v, m.x_a, m.x_g)]
    r, k, v = xr @ m.receptance.weight.T, xk @ m.key.weight.T, xv @ m.value.weight.T
    w = torch.exp(-math.exp(-0.5) * torch.sigmoid(m.w0 + torch.tanh(xw @ m.w1) @ m.w2))
    a = torch.sigmoid(m.a0 + xa @ m.a1 @ m.a2)
    g = torch.sigmoid(xg @ m.g1) @ m.g2
    kk = k * m.k_k
    kp = k * (1 + (a - 1) * m.k_a)
    o = torch.zeros(b, n, H, N, dtype=x.dtype)
    bonus = torch.zeros(b, n, H, N, dtype=x.dtype)
    for i in range(b):
        for h in range(H):
            c = slice(h * N, (h + 1) * N)
            S = torch.zeros(N, N, dtype=x.dtype)  # S[value, key]
            for t in range(n):
                kh = kk[i, t, c] / kk[i, t, c].norm().clamp_min(1e-12)
                A = torch.diag(w[i, t, c]) - torch.outer(kh, a[i, t, c] * kh)
                S = S @ A + torch.outer(v[i, t, c], kp[i, t, c])
                o[i, t, h] = S @ r[i, t, c]
                bonus[i, t, h] = (r[i, t, c] * kp[i, t, c] * m.r_k[h]).sum() * v[i, t, c]
    mean, var = o.mean(-1, keepdim=True), o.var(-1, unbiased=False, keepdim=True)
    o = ((o - mean) / torch.sqrt(var + m.ln_x.eps)).reshape(b, n, d) * m.ln_x.weight + m.ln_x.bias
    return ((o + bonus.reshape(b, n, d)) * g) @ m.output.weight.T


def close(got, want, tol=1e-10):
    return (got - want).abs().max().item() <= tol * want.abs().max().item()


@pytest.mark.parametrize("chunk,n", [(1, 5), (3, 21), (8, 21), (16, 5), (64, 21)])
def test_matches_the_paper(chunk, n):
    m, _, _ = make_op("rnn", "rwkv7", d=D, causal=True, chunk=chunk, **SMALL)
    perturb_params(m)
    x = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        assert close(m(x, Ctx()), reference(m, x))


def test_one_head_of_the_whole_width():
    m, _, _ = make_op("rnn", "rwkv7", d=8, causal=True, chunk=4, head_size=8, decay_rank=2, a_rank=2, gate_rank=2)
    perturb_params(m)
    x = torch.randn(1, 9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert close(m(x, Ctx()), reference(m, x))


@pytest.mark.parametrize("n", [1, 7, 33, 64])
def test_the_chunked_kernel_is_the_recurrence(n):
    """Float64, RWKV-7's ranges (decays in (e^-e^-0.5, 1), a unit removal key, rates in (0, 1)), a state before."""
    gen = torch.Generator().manual_seed(n)
    b, h, dk, dv = 2, 3, 5, 4
    r, k = (torch.randn(b, h, n, dk, dtype=torch.float64, generator=gen) for _ in range(2))
    v = torch.randn(b, h, n, dv, dtype=torch.float64, generator=gen)
    g = -math.exp(-0.5) * torch.rand(b, h, n, dk, dtype=torch.float64, generator=gen)
    kh = torch.nn.functional.normalize(torch.randn(b, h, n, dk, dtype=torch.float64, generator=gen), dim=-1)
    a = torch.rand(b, h, n, dk, dtype=torch.float64, generator=gen)
    s0 = torch.randn(b, h, dk, dv, dtype=torch.float64, generator=gen)
    want, want_s = recurrent_dplr(r, k, v, g, a * kh, -kh, s0)
    for chunk in (1, 4, 16, 64):
        o, s = chunked_dplr(r, k, v, g, a * kh, -kh, s0, chunk)
        assert close(o, want) and close(s, want_s)


@pytest.mark.parametrize("chunk", [4, 7])
def test_decodes_with_a_constant_state(chunk):
    """The step form equals the forward piece by piece (single tokens, uneven pieces, a prompt); its state is the
    declared kv_cache (the last input and H states of N x N), the same at every length (the leak test: test_leaks.py)."""
    m, _, _ = make_op("rnn", "rwkv7", d=D, causal=True, chunk=chunk, **SMALL)
    perturb_params(m)
    nbytes = assert_decodes_with_constant_state(m, "rnn", "rwkv7", D, {"chunk": chunk, **SMALL})
    assert nbytes[0] == 2 * (D + 4 * 4 * 4) * 8


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_enters_no_state(side):
    m, _, _ = make_op("rnn", "rwkv7", d=D, causal=True, chunk=4, **SMALL)
    perturb_params(m)
    assert_padded_row_alone(m, side, d=D)


def test_validation():
    base = ("vocab = 50\nd_model = 32\nmodel m(causal={c}) = input(tokens) -> embed(token) -> norm -> rnn(rwkv7{a}) "
            "-> norm -> head(lm)\n")
    evodsl.parse(base.format(c="true", a=", head_size=8"))
    with pytest.raises(EvoError, match="causal only"):
        evodsl.parse(base.format(c="false", a=", head_size=8"))
    with pytest.raises(EvoError, match="not a multiple of head_size 12"):
        evodsl.parse(base.format(c="true", a=", head_size=12"))
    for bad in ("chunk=0", "chunk=65", "head_size=0", "decay_rank=0", "a_rank=0", "gate_rank=0", "eps=0.0"):
        with pytest.raises(EvoError, match=bad.split("=")[0]):
            evodsl.parse(base.format(c="true", a=", " + bad))


def test_the_export_form_equals_the_chunked_form():
    """The one-piece form that a symbolic n exports (parallel_dplr, a zero state) is the same map."""
    m, _, _ = make_op("rnn", "rwkv7", d=D, causal=True, chunk=4, **SMALL)
    perturb_params(m)
    x = torch.randn(2, 13, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = m(x, Ctx())
        import evodsl.ops.rnn.rwkv7 as mod
        real = mod.chunked_dplr
        mod.chunked_dplr = lambda r, k, v, g, a, b, s0, chunk: (mod.parallel_dplr(r, k, v, g, a, b), None)
        try:
            got = m(x, Ctx())
        finally:
            mod.chunked_dplr = real
    assert close(got, want)
