"""pos(randomized) and pos(randomized_rope) (2305.16843): in training, positions are a sorted sample of n distinct
values of 0..L-1, fresh per forward, shared by the batch and every layer; outside training 0..n-1. Checked against
float64 references written from the paper's equation with the sample drawn by the same seeded RNG, in eval against
the plain schemes, through softmax attention, decoding at an offset, and the refusals."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

import evodsl
from evodsl.ops import Ctx, load_all, lookup
from ophelpers import assert_no_leak, decode_in_pieces, make_op, perturb_params


def _randn(*shape, seed=3):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def drawn(seed, n, limit):
    """The sample the paper prescribes, by the RNG state the op will see: n of 0..limit-1, distinct, sorted."""
    torch.manual_seed(seed)
    return sorted(torch.randperm(limit)[:n].tolist())


def ref_sinusoid(p, d, base=10000.0):
    return [math.sin(p / base ** (c / d)) if c % 2 == 0 else math.cos(p / base ** ((c - 1) / d)) for c in range(d)]


@pytest.mark.parametrize("d", [8, 7])
def test_training_adds_the_encoding_at_sampled_positions(d):
    m, _, _ = make_op("pos", "randomized", d=d, max_len=100)
    m.train()
    x = _randn(2, 12, d)
    pos = drawn(5, 12, 100)
    torch.manual_seed(5)
    ctx = Ctx()
    got = m(x, ctx)
    assert ctx.extra["randomized_positions"].tolist() == pos
    assert len(set(pos)) == 12 and pos == sorted(pos) and max(pos) < 100
    want = x + torch.tensor([ref_sinusoid(p, d) for p in pos], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
    assert not torch.equal(m(x, Ctx()), got)  # a fresh sample the next forward
    m.eval()
    assert torch.allclose(m(x, None), x + torch.tensor([ref_sinusoid(t, d) for t in range(12)], dtype=torch.float64),
                          atol=1e-12, rtol=0)


def test_learned_table_rows():
    m, _, _ = make_op("pos", "randomized", d=8, max_len=40, scheme="learned")
    perturb_params(m)
    x = _randn(2, 9, 8)
    pos = drawn(7, 9, 40)
    m.train()
    torch.manual_seed(7)
    assert torch.allclose(m(x, Ctx()), x + m.weight[pos], atol=1e-12, rtol=0)
    m.eval()
    assert torch.allclose(m(x, Ctx(offset=4)), x + m.weight[4:13], atol=1e-12, rtol=0)  # decoding at offset 4
    assert m.weight.shape == (40, 8)


def mode(m, training: bool):
    """m and the stream module bound upstream of it (ophelpers.make_op: not a child, so set apart), as a model's
    train() / eval() sets both."""
    m.train(training)
    m.pos_source.train(training)


def ref_rope_at(x, pos, base=10000.0):
    y = x.clone()
    r = x.shape[-1]
    for row, t in enumerate(pos):
        for i in range(r // 2):
            c, s = math.cos(t * base ** (-2 * i / r)), math.sin(t * base ** (-2 * i / r))
            a, b = x[..., row, 2 * i], x[..., row, 2 * i + 1]
            y[..., row, 2 * i], y[..., row, 2 * i + 1] = a * c - b * s, a * s + b * c
    return y


@pytest.mark.parametrize("cap", [None, 0.7], ids=["plain", "softcap"])
@pytest.mark.parametrize("causal", [True, False])
def test_randomized_rope_through_softmax_attention(causal, cap):
    """Training (dropout 0): softmax(QK^T/sqrt(dh)) V with Q, K turned at the sampled positions (GQA); with
    softcap= (the explicit-score kernel, which binds the sample too) the scores capped, c tanh(s / c)."""
    m, _, _ = make_op("mha", "softmax", d=32, heads=4, kv_heads=2, causal=causal, softcap=cap,
                      pos=("randomized_rope", {"max_len": 64}))
    perturb_params(m, scale=0.3)
    x = _randn(2, 15, 32)
    b, n, _ = x.shape
    pos = drawn(11, n, 64)
    proj = lambda lin, heads: (x @ lin.weight.T + lin.bias).view(b, n, heads, 8).transpose(1, 2)
    q, k, v = ref_rope_at(proj(m.q_proj, 4), pos), ref_rope_at(proj(m.k_proj, 2), pos), proj(m.v_proj, 2)
    kv_of = [0, 0, 1, 1]
    s = q @ k[:, kv_of].transpose(-1, -2) / math.sqrt(8)
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    want = (s.softmax(-1) @ v[:, kv_of]).transpose(1, 2).reshape(b, n, 32) @ m.o_proj.weight.T + m.o_proj.bias
    mode(m, True)
    torch.manual_seed(11)
    with torch.no_grad():
        assert torch.allclose(m(x, None), want, atol=1e-10, rtol=0)
    mode(m, False)  # outside training: pos(rope)
    rope, _, _ = make_op("mha", "softmax", d=32, heads=4, kv_heads=2, causal=causal, softcap=cap, pos=("rope", {}))
    rope.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.allclose(m(x, None), rope(x, None), atol=1e-12, rtol=0)


def test_every_layer_reads_the_same_sample():
    src = ("d_model = 32\nheads = 4\nmodel m(causal=true) = input(tokens, vocab=50) -> embed(token) -> "
           "pos(randomized_rope, max_len=1000) -> repeat(norm -> mha -> norm -> ffn, 3) -> head(lm)")
    model = evodsl.compile(src, dtype=torch.float64)
    seen = []
    for mod in model.modules():
        if type(mod).__name__ == "RandomizedRotary":
            original = mod.rotate
            mod.rotate = (lambda orig, me: lambda q, k, offset=0: (seen.append(me._positions), orig(q, k, offset))[1])(
                original, mod)
    model.train()
    model(torch.randint(0, 50, (2, 20)))
    assert len(seen) == 3 and all(p is seen[0] for p in seen) and seen[0].max() >= 20  # reaches past n
    seen.clear()
    model.eval()
    model(torch.randint(0, 50, (2, 20)))
    assert seen == [None] * 3


@pytest.mark.parametrize("mods", [{}, {"softcap": 0.7}, {"sink_logit": True}, {"talking": True}],
                         ids=["plain", "softcap", "sink_logit", "talking"])
def test_decoding_and_no_leak(mods):
    """Decoding in pieces equals the forward; in training, at the sampled positions, no position reads a later one
    (the plain kernel and the explicit-score one of the modifiers)."""
    m, _, _ = make_op("mha", "softmax", d=32, heads=4, kv_heads=2, causal=True,
                      pos=("randomized_rope", {"max_len": 256}), **mods)
    perturb_params(m)
    mode(m, False)
    x = _randn(2, 21, 32)
    with torch.no_grad():
        got, _ = decode_in_pieces(m, x, [5, 1, 1, 14])
        assert torch.allclose(got, m(x, None), atol=1e-10, rtol=0)
        mode(m, True)
        torch.manual_seed(0)
        # the same sample for every call; n = 70: two blocks of the explicit-score kernel's 64 queries
        assert_no_leak(lambda t: (torch.manual_seed(0), m(t, None))[1], n=70)


def test_refusals():
    load_all()
    with pytest.raises(ValidationError):
        lookup("pos", "randomized").params(max_len=0)
    with pytest.raises(ValidationError):
        lookup("pos", "randomized").params(max_len=64, scheme="rope")  # rope's is pos(randomized_rope)
    m, _, _ = make_op("pos", "randomized", d=8, max_len=10)
    m.train()
    with pytest.raises(RuntimeError, match="longer than max_len=10"):
        m(_randn(1, 11, 8), Ctx())
    src = ("d_model = 32\nheads = 4\nmodel m(causal=true) = input(features, d=32) -> embed(linear) -> "
           "pos(randomized_rope, max_len=64) -> mha(local, window=4) -> head(linear, d_out=2)")
    with pytest.raises(evodsl.EvoError, match="pos\\(randomized_rope\\) works inside: mha\\(softmax\\)"):
        evodsl.compile(src)
