"""rnn(rwkv4) and ffn(rwkv) against the paper's equations (Peng et al. 2023, eq. 13-20), in float64, written here
from the module's weights: the token shift, the three mixes, and WKV as the paper's explicit sums
sum_{i<t} e^{-(t-1-i) w + k_i} v_i + e^{u + k_t} v_t over the same with 1 (no recurrence, no running max). The
chunked WKV equals it at every chunk size (n not a multiple, n below a chunk, one token a chunk); the step form
equals the forward piece by piece with a constant state; keys far past exp's range stay exact."""
from __future__ import annotations

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import (assert_decodes_with_constant_state, assert_no_leak, assert_padded_row_alone, make_op,
                       perturb_params)

D = 16


def shifted(x, mu):
    prev = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), 1)
    return x * mu + prev * (1 - mu)


def wkv_sums(w, u, k, v):
    n = k.shape[1]
    y = torch.zeros_like(k)
    for t in range(n):
        num, den = torch.exp(u + k[:, t]) * v[:, t], torch.exp(u + k[:, t])
        for i in range(t):
            e = torch.exp(-(t - 1 - i) * w + k[:, i])
            num, den = num + e * v[:, i], den + e
        y[:, t] = num / den
    return y


def wkv_softmax(w, u, k, v):
    """The same quotient as a softmax over each position's log-weights (-(t-1-i) w + k_i, i < t; u + k_t): finite for
    any keys."""
    n = k.shape[1]
    y = torch.zeros_like(k)
    for t in range(n):
        logits = torch.stack([-(t - 1 - i) * w + k[:, i] for i in range(t)] + [u + k[:, t]], 1)
        y[:, t] = (logits.softmax(1) * v[:, :t + 1]).sum(1)
    return y


def time_mix(m, x):
    k = shifted(x, m.time_mix_key) @ m.key.weight.T
    v = shifted(x, m.time_mix_value) @ m.value.weight.T
    r = torch.sigmoid(shifted(x, m.time_mix_receptance) @ m.receptance.weight.T)
    return (r * wkv_sums(torch.exp(m.time_decay), m.time_first, k, v)) @ m.output.weight.T


def channel_mix(m, x):
    k = torch.relu(shifted(x, m.time_mix_key) @ m.key.weight.T) ** 2
    return torch.sigmoid(shifted(x, m.time_mix_receptance) @ m.receptance.weight.T) * (k @ m.value.weight.T)


def close(got, want, tol=1e-10):
    return (got - want).abs().max().item() <= tol * want.abs().max().item()


@pytest.mark.parametrize("chunk", [1, 3, 16])
@pytest.mark.parametrize("n", [1, 5, 37])
def test_time_mix_matches_the_paper(chunk, n):
    m, _, _ = make_op("rnn", "rwkv4", d=D, causal=True, chunk=chunk)
    perturb_params(m)
    x = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        assert close(m(x, Ctx()), time_mix(m, x))


def test_keys_past_exp_range_stay_exact():
    """Keys of a few hundred (e^k overflows float32 and float64's e^800): the running max keeps every exponent <= 0;
    float32 agrees with the quotient computed in float64 as a softmax over each position's log-weights."""
    m, _, _ = make_op("rnn", "rwkv4", d=D, causal=True, chunk=8, dtype=torch.float32)
    perturb_params(m)
    with torch.no_grad():
        m.key.weight.mul_(300)
    x = torch.randn(2, 30, D, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = m(x, Ctx())
        m64 = m.double()
        k = shifted(x.double(), m64.time_mix_key) @ m64.key.weight.T
        v = shifted(x.double(), m64.time_mix_value) @ m64.value.weight.T
        r = torch.sigmoid(shifted(x.double(), m64.time_mix_receptance) @ m64.receptance.weight.T)
        want = (r * wkv_softmax(torch.exp(m64.time_decay), m64.time_first, k, v)) @ m64.output.weight.T
    assert k.abs().max() > 800 and torch.isfinite(got).all()
    assert close(got.double(), want, 1e-4)


@pytest.mark.parametrize("n", [1, 5, 23])
def test_channel_mix_matches_the_paper(n):
    m, _, _ = make_op("ffn", "rwkv", d=D, d_ff=40)
    perturb_params(m)
    x = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        assert close(m(x, Ctx()), channel_mix(m, x))


@pytest.mark.parametrize("family,variant,args", [("rnn", "rwkv4", {"chunk": 4}), ("rnn", "rwkv4", {"chunk": 7}),
                                                 ("ffn", "rwkv", {})])
def test_decodes_with_a_constant_state(family, variant, args):
    """The step form equals the forward piece by piece (single tokens, uneven pieces, a prompt); its state is the
    declared kv_cache, the same at every length (rnn(rwkv4)'s leak test: test_leaks.py; ffn(rwkv)'s below)."""
    m, _, _ = make_op(family, variant, d=D, causal=True, **args)
    perturb_params(m)
    nbytes = assert_decodes_with_constant_state(m, family, variant, D, args)
    assert nbytes[0] == 2 * D * (4 if family == "rnn" else 1) * 8


def test_channel_mix_does_not_leak():
    m, _, _ = make_op("ffn", "rwkv", d=D)
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda t: m(t, Ctx()), n=12, d=D)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family,variant,args", [("rnn", "rwkv4", {"chunk": 4}), ("ffn", "rwkv", {})])
def test_padding_enters_no_state(family, variant, args, side):
    m, _, _ = make_op(family, variant, d=D, causal=True, **args)
    perturb_params(m)
    assert_padded_row_alone(m, side, d=D)


def test_validation():
    base = ("vocab = 50\nd_model = 32\nmodel m(causal={c}) = input(tokens) -> embed(token) -> norm -> rnn(rwkv4{a}) "
            "-> norm -> ffn(rwkv{f}) -> norm -> head(lm)\n")
    evodsl.parse(base.format(c="true", a=", chunk=8", f=", d_ff=64"))
    with pytest.raises(EvoError, match="causal only"):
        evodsl.parse(base.format(c="false", a="", f=""))
    for a, f, bad in ((", chunk=0", "", "chunk"), ("", ", d_ff=0", "d_ff")):
        with pytest.raises(EvoError, match=bad):
            evodsl.parse(base.format(c="true", a=a, f=f))
