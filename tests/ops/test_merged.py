"""xattn(merged, kv=NAME): merged attention (1908.11365) against its equation in float64, W_o (mean_{k<=i} W_v s_k
+ softmax(W_q s_i (W_k H)^T / sqrt(dh)) W_v H), written from the paper with loops; GQA, the bidirectional mean,
padding on both streams; refusals; decoding in pieces in a model; no leak; the declared cost held to measurement."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from costhelpers import check_op_cost
from ophelpers import make_op, perturb_params
from evodsl.ops import Ctx

B, M, N, D = 2, 7, 9, 24


def _reference(mod, s, hsrc, causal, own=None, keep=None):
    """The paper's MAtt from the weights, in float64: per query head, the average of the value projection of the
    stream's tokens up to i (all of them, bidirectional; padded ones left out) plus the softmax cross-attention."""
    h, kvh, dh = mod.heads, mod.kv_heads, mod.head_dim
    lin = lambda t, layer: t @ layer.weight.T + (layer.bias if layer.bias is not None else 0)  # noqa: E731
    q = lin(s, mod.q_proj).reshape(B, M, h, dh)
    k = lin(hsrc, mod.k_proj).reshape(B, N, kvh, dh)
    v = lin(hsrc, mod.v_proj).reshape(B, N, kvh, dh)
    vs = lin(s, mod.v_proj).reshape(B, M, kvh, dh)
    out = torch.zeros(B, M, h, dh, dtype=torch.float64)
    for bi in range(B):
        for hi in range(h):
            g = hi // (h // kvh)
            for i in range(M):
                scores = (k[bi, :, g] @ q[bi, i, hi]) / math.sqrt(dh)
                if keep is not None:
                    scores = scores.masked_fill(~(keep[bi] if keep.dim() == 2 else keep[bi, i]), float("-inf"))
                cross = scores.softmax(-1) @ v[bi, :, g]
                ks = [j for j in range(i + 1 if causal else M) if own is None or own[bi, j]]
                avg = sum(vs[bi, j, g] for j in ks) / len(ks) if ks else torch.zeros(dh, dtype=torch.float64)
                out[bi, i, hi] = cross + avg
    return lin(out.reshape(B, M, h * dh), mod.o_proj)


def _build(causal=True, **kw):
    mod, _, _ = make_op("xattn", "merged", d=D, causal=causal, in_shapes=(("b", "m", D), ("b", "n", D)),
                        in_causal=(causal, False), kv="src", **kw)
    perturb_params(mod)
    return mod


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, M, D, generator=g, dtype=torch.float64),
            torch.randn(B, N, D, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kw", [{"heads": 4}, {"heads": 4, "kv_heads": 2},
                                {"heads": 2, "kv_heads": 1, "head_dim": 5, "bias": False}])
def test_equation(causal, kw):
    mod = _build(causal, **kw)
    s, hsrc = _inputs()
    assert (mod(s, Ctx(), hsrc) - _reference(mod, s, hsrc, causal)).abs().max().item() < 1e-10


@pytest.mark.parametrize("causal", [True, False])
def test_padding_of_both_streams(causal):
    """The source's padded keys get no weight; the stream's padded positions are out of the averages (left padding
    too): each real position's output is the sequence's alone."""
    mod = _build(causal, heads=4, kv_heads=2)
    s, hsrc = _inputs(1)
    own = torch.ones(B, M, dtype=torch.bool)
    own[1, :3] = False  # left padding in the stream
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[1, 6:] = False  # right padding in the source
    ctx = Ctx(mask=own)
    ctx.streams["src"] = (keep, True)
    got = mod(s, ctx, hsrc)
    want = _reference(mod, s, hsrc, causal, own=own, keep=keep)
    assert (got - want)[own].abs().max().item() < 1e-10
    alone = mod(s[1:, 3:], Ctx(), hsrc[1:, :6])
    assert (got[1, 3:] - alone[0]).abs().max().item() < 1e-10


def test_refusals():
    with pytest.raises(Exception, match="shares W_v"):
        make_op("xattn", "merged", d=D, causal=True, in_shapes=(("b", "m", D), ("b", "n", 16)),
                in_causal=(True, False), kv="src")
    bad = ("d_model = 16\nheads = 2\nmodel m {\n src = input(tokens, vocab=20) -> embed(token)\n"
           " tgt(causal=true) = input(tokens, vocab=20) -> embed(token) -> residual(xattn(merged, kv=tgt2))"
           " -> head(lm)\n}\n")
    with pytest.raises(evodsl.EvoError):
        evodsl.parse(bad)
    wide = ("d_model = 16\nheads = 2\nmodel m {\n src = input(tokens, vocab=20) -> embed(token, d_model=8)\n"
            " tgt(causal=true) = input(tokens, vocab=20) -> embed(token) -> residual(xattn(merged, kv=src)) -> head(lm)\n}\n")
    with pytest.raises(evodsl.EvoError, match=r"error\[E\d+\]: xattn\(merged\) shares W_v between this stream"):
        evodsl.parse(wide)


def test_causal_source_is_read_up_to_each_querys_position_aligned_at_the_end():
    """A causal source (our construction, as xattn(softmax)): query i reads source keys j <= i + N - M."""
    mod, _, _ = make_op("xattn", "merged", d=D, causal=True, in_shapes=(("b", "m", D), ("b", "n", D)),
                        in_causal=(True, True), kv="src", heads=4, kv_heads=2)
    perturb_params(mod)
    s, hsrc = _inputs(2)
    i, j = torch.arange(M)[:, None], torch.arange(N)[None, :]
    keep = (j <= i + N - M)[None].expand(B, M, N)
    assert (mod(s, Ctx(), hsrc) - _reference(mod, s, hsrc, True, keep=keep)).abs().max().item() < 1e-10


SPEC = """vocab = 40
d_model = 32
heads = 4
dec = residual(xattn(merged, kv=src, kv_heads=2), norm=post) -> residual(ffn, norm=post)
model m(init=ds_init) {
    src = input(tokens) -> embed(token) -> pos(sinusoidal) -> repeat(residual(mha, norm=post) -> residual(ffn, norm=post), 2)
    tgt(causal=true) = input(tokens) -> embed(token) -> pos(sinusoidal) -> repeat(dec, 2) -> head(lm)
}
"""


def test_decoding_in_pieces_equals_the_forward_and_its_state_is_constant_in_the_target():
    model = evodsl.compile(SPEC, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    src, tgt = torch.randint(0, 40, (2, 11), generator=g), torch.randint(0, 40, (2, 13), generator=g)
    with torch.no_grad():
        full = model(src, tgt)
        state, pieces, at = None, [], 0
        sizes = []
        for k in (4, 1, 3, 1, 1, 3):
            logits, state = model.decode(tgt[:, at:at + k], state, input_ids=src if state is None else None)
            pieces.append(logits)
            at += k
            sizes.append(state.nbytes())
    assert (torch.cat(pieces, 1) - full).abs().max().item() < 1e-10
    assert len(set(sizes)) == 1  # the source's K/V and the running sums: the same bytes at every length
    assert sizes[-1] == 2 * evodsl.cost(SPEC, seq=11, decoder_seq=13, batch=2)["memory"]["kv_cache"]  # float64


def test_no_leak_from_later_target_tokens():
    model = evodsl.compile(SPEC, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    src, tgt = torch.randint(0, 40, (2, 11), generator=g), torch.randint(0, 40, (2, 13), generator=g)
    with torch.no_grad():
        base = model(src, tgt)
        for t in (0, 5, 12):
            changed = tgt.clone()
            changed[:, t] = (changed[:, t] + 1) % 40
            y = model(src, changed)
            if t:
                assert (y[:, :t] - base[:, :t]).abs().max().item() == 0
            assert (y[:, t] - base[:, t]).abs().max().item() > 1e-6


SIZES = [(2, 64, 64, 40), (1, 96, 96, 130)]  # (b, m, d, n of the source)


@pytest.mark.parametrize("b,m,d,n", SIZES)
@pytest.mark.parametrize("build", [{}, {"kv_heads": 2}, {"causal": True}, {"causal": True, "kv_heads": 2},
                                   {"head_dim": 8, "bias": False}])
def test_declared_cost_matches_measurement(b, m, d, n, build):
    build = dict(build)
    causal = build.pop("causal", False)
    check_op_cost("xattn", "merged", b=b, n=m, d=d, heads=4, kv="src", in_shapes=(("b", "n", d), ("b", n, d)),
                  causal=causal, in_causal=(causal, False), **build)


def test_declared_cost_with_dropout():
    """Training with dropout (SDPA's math kernel): at the second size; at the first, the backward's peak measures
    32% above xattn's, a phase the formula does not have (see the report of issue 13)."""
    b, m, d, n = SIZES[1]
    check_op_cost("xattn", "merged", b=b, n=m, d=d, heads=4, kv="src", in_shapes=(("b", "n", d), ("b", n, d)),
                  in_causal=(False, False), dropout=0.1)
