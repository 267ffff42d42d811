"""rnn(rwkv6) against the paper's recurrence (Peng et al. 2024, eq. 11-19; the authors' x060 code), in float64,
written here token by token from the module's weights: the ddlerp token shift with its LoRA, the data-dependent
decay w_t = exp(-exp(w0 + tanh(x_w D_1) D_2)), per head S_t = diag(w_t) S_{t-1} + k_t^T v_t and o_t = r_t (S_{t-1}
+ diag(u) k_t^T v_t), GroupNorm per head, the silu gate, W_o. The chunked form equals it at every chunk size (n not a
multiple, n below a chunk, one token a chunk); the step form equals the forward piece by piece with a constant
state; padding enters no state."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import (assert_decodes_with_constant_state, assert_matches_in_float32_and_float64,
                       assert_padded_row_alone, make_op, perturb_params)

D = 16
SMALL = {"head_size": 4, "mix_rank": 3, "decay_rank": 5}


def reference(m, x):
    b, n, d = x.shape
    H, N = m.H, m.N
    dx = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), 1) - x
    lora = torch.tanh((x + dx * m.time_maa_x) @ m.time_maa_w1).view(b, n, 5, -1)
    mus = [m.time_maa_w, m.time_maa_k, m.time_maa_v, m.time_maa_r, m.time_maa_g]
    xw, xk, xv, xr, xg = [x + dx * (mu + lora[:, :, i] @ m.time_maa_w2[i]) for i, mu in enumerate(mus)]
    r, k, v = xr @ m.receptance.weight.T, xk @ m.key.weight.T, xv @ m.value.weight.T
    g = F.silu(xg @ m.gate.weight.T)
    w = torch.exp(-torch.exp(m.time_decay + torch.tanh(xw @ m.time_decay_w1) @ m.time_decay_w2))
    o = torch.zeros(b, n, H, N, dtype=x.dtype)
    for i in range(b):
        for h in range(H):
            c = slice(h * N, (h + 1) * N)
            S = torch.zeros(N, N, dtype=x.dtype)
            for t in range(n):
                kv = torch.outer(k[i, t, c], v[i, t, c])
                o[i, t, h] = r[i, t, c] @ (S + m.time_faaaa[h][:, None] * kv)
                S = w[i, t, c][:, None] * S + kv
    mean, var = o.mean(-1, keepdim=True), o.var(-1, unbiased=False, keepdim=True)
    o = ((o - mean) / torch.sqrt(var + m.ln_x.eps)).reshape(b, n, d) * m.ln_x.weight + m.ln_x.bias
    return (o * g) @ m.output.weight.T


def close(got, want, tol=1e-10):
    return (got - want).abs().max().item() <= tol * want.abs().max().item()


@pytest.mark.parametrize("chunk", [1, 3, 8])
@pytest.mark.parametrize("n", [1, 5, 21])
def test_matches_the_paper(chunk, n):
    """To 1e-10 at chunks up to 8 with these perturbed decays (up to ~e^3 a token); the factorised kernel's
    exp(+-B) loses digits as T |log w| grows: 4e-10 at T = 16 here."""
    m, _, _ = make_op("rnn", "rwkv6", d=D, causal=True, chunk=chunk, **SMALL)
    perturb_params(m)
    x = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        assert close(m(x, Ctx()), reference(m, x))


def test_one_head_of_the_whole_width():
    m, _, _ = make_op("rnn", "rwkv6", d=8, causal=True, chunk=4, head_size=8, mix_rank=2, decay_rank=2)
    perturb_params(m)
    x = torch.randn(1, 9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert close(m(x, Ctx()), reference(m, x))


@pytest.mark.parametrize("chunk", [4, 7])
def test_decodes_with_a_constant_state(chunk):
    """The step form equals the forward piece by piece (single tokens, uneven pieces, a prompt); its state is the
    declared kv_cache (the last input and H states of N x N), the same at every length (the leak test: test_leaks.py)."""
    m, _, _ = make_op("rnn", "rwkv6", d=D, causal=True, chunk=chunk, **SMALL)
    perturb_params(m)
    nbytes = assert_decodes_with_constant_state(m, "rnn", "rwkv6", D, {"chunk": chunk, **SMALL})
    assert nbytes[0] == 2 * (D + 4 * 4 * 4) * 8


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_enters_no_state(side):
    m, _, _ = make_op("rnn", "rwkv6", d=D, causal=True, chunk=4, **SMALL)
    perturb_params(m)
    assert_padded_row_alone(m, side, d=D)


def test_the_export_form_equals_the_chunked_form():
    """The one-piece form that a symbolic n exports (parallel_decay on the shifted queries) is the same map."""
    m, _, _ = make_op("rnn", "rwkv6", d=D, causal=True, chunk=4, **SMALL)
    perturb_params(m)
    x = torch.randn(2, 13, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = m(x, Ctx())
        import evodsl.ops.rnn.rwkv6 as mod
        real = mod.chunked_decay
        mod.chunked_decay = lambda q, k, v, g, s0, chunk: (mod.parallel_decay(q, k, v, g), None)
        try:
            got = m(x, Ctx())
        finally:
            mod.chunked_decay = real
    assert close(got, want)


def test_validation():
    base = ("vocab = 50\nd_model = 32\nmodel m(causal={c}) = input(tokens) -> embed(token) -> norm -> rnn(rwkv6{a}) "
            "-> norm -> head(lm)\n")
    evodsl.parse(base.format(c="true", a=", head_size=8"))
    with pytest.raises(EvoError, match="causal only"):
        evodsl.parse(base.format(c="false", a=", head_size=8"))
    with pytest.raises(EvoError, match="not a multiple of head_size 12"):
        evodsl.parse(base.format(c="true", a=", head_size=12"))
    for bad in ("chunk=0", "head_size=0", "mix_rank=0", "decay_rank=0", "eps=0.0"):
        with pytest.raises(EvoError, match=bad.split("=")[0]):
            evodsl.parse(base.format(c="true", a=", " + bad))


@pytest.mark.parametrize("chunk", [8, 16])
def test_a_channel_that_forgets_at_once(chunk):
    """Decays of exp(-e^2) to exp(-e^6) a token (trained models have channels that forget at once), in float32:
    the chunk's decay passes e^-71, where the kernel's factorisation exp(B_i) exp(-B_j) would leave the float
    range, so it takes the ratios one lag at a time; against the float64 recurrence. A floor on the decay (what it
    had, -5.5 a token at T = 8) keeps a factor of 0.004 in place of e^-7.4 and fails this."""
    m, _, _ = make_op("rnn", "rwkv6", d=D, causal=True, chunk=chunk, **SMALL)
    perturb_params(m)
    with torch.no_grad():
        m.time_decay.copy_(torch.linspace(2.0, 6.0, D).view(1, 1, D))
    x = torch.randn(2, 40, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert_matches_in_float32_and_float64(m, x, reference, torch.float32, Ctx())


def test_a_channel_that_forgets_at_once_costs_no_more():
    """The declared costs are the factorised kernel's; where the decay takes the ratios instead, the layer keeps and
    peaks at no more than that, measured (it keeps B in place of exp(-B) and k exp(-B); its [T, T] scores are
    elementwise, not a matmul, so the counted matmul FLOPs are the declared less those scores')."""
    from costhelpers import declared, make_input, measure_op
    from evodsl.passes.cost import cost_field

    module, env, cost, ev = declared("rnn", "rwkv6", 2, 64, causal=True, chunk=16, head_size=16)
    with torch.no_grad():
        module.time_decay.add_(6.0)
    m = measure_op(module, make_input(env, 2, 64, torch.float32))
    for key in ("saved", "peak", "bwd_peak"):
        assert 0.9 * ev(getattr(cost, key)) <= m[key] <= ev(getattr(cost, key)), (key, m[key], ev(getattr(cost, key)))
    scores = 2 * 2 * (64 // 16) * 2 * 16 * 16 * 16  # b 2, H 2 heads of N 16, 4 chunks: 2 T^2 N each
    assert m["fwd"] == ev(cost_field(cost, "fwd")) - scores and m["bwd"] == ev(cost_field(cost, "bwd")) - 2 * scores
