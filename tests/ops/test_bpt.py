"""mha(bpt) against its definition, in float64: the paper's graph builder walked token by token (scalar
pointers, written here apart from the op's vectorised table), span nodes as the mean of their tokens' inputs
projected by k_proj and v_proj, one softmax per token over its slots with the edge-type vectors; the slots of a
token partition the sequence (every position reachable, once); causal reads only the past; left padding refused."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from evodsl.ops.attention.bpt import levels
from ophelpers import assert_no_leak, head_projections, make_op, output_projection, perturb_params

D = 32


def walk(n: int, k: int, causal: bool, clip: int):
    """The contextual edges of every token, as the paper's builder makes them: [(level, index, edge type)] per
    token, the token itself first. A span whose first position is past n is not there."""
    out = []
    for i in range(n):
        edges = [(0, i, 0)]
        lp, rp, lo, ro, j = i - 1, i + 1, False, False, 0
        while lp >= 0 or (not causal and (rp << j) < n):
            for m in range(k):
                if not causal:
                    lev, idx = (j - 1, 2 * rp + 1) if ro else (j, rp)
                    if idx << lev < n:
                        edges.append((lev, idx, (2 * k + 1) * min(j, clip) + 2 * m + 2))
                    ro, rp = False, rp + 1
                if lp >= 0:
                    lev, idx = (j - 1, 2 * lp) if lo else (j, lp)
                    edges.append((lev, idx, (2 * k + 1) * min(j, clip) + 2 * m + 1))
                    lo = False
                lp -= 1
            lo, ro = lp % 2 == 0, rp % 2 == 1
            lp, rp, j = lp // 2, rp // 2, j + 1
        out.append(edges)
    return out


def reference_bpt(m, x, k, causal, clip, rel=True):
    b, n, _ = x.shape
    h, g, dh = m.heads, m.kv_heads, m.head_dim
    q, _, _ = head_projections(m, x)
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for i, edges in enumerate(walk(n, k, causal, clip)):
        spans = [x[:, idx << lev: min((idx + 1) << lev, n)].mean(1, keepdim=True) for lev, idx, _ in edges]
        _, ks, vs = head_projections(m, torch.cat(spans, 1))  # the span nodes' keys and values [b, S, kv, dh]
        for hh in range(h):
            kh = hh // (h // g)
            s = torch.einsum("bd,bsd->bs", q[:, i, hh], ks[:, :, kh])
            if rel:
                s = s + torch.einsum("bd,sd->bs", q[:, i, hh], m.rel[[t for _, _, t in edges]])
            w = torch.softmax(s / math.sqrt(dh), -1)
            out[:, i, hh] = torch.einsum("bs,bsd->bd", w, vs[:, :, kh])
    return output_projection(m, out.reshape(b, n, h * dh))


@pytest.mark.parametrize("n", [1, 2, 16, 37, 70])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_slots_partition_the_sequence(n, k, causal):
    """Every position j != i (j < i causal) lies in exactly one span token i reads, and the op's table is the
    builder's walk."""
    from evodsl.ops.attention.bpt import slot_table
    lev, idx, ok, typ = slot_table(n, k, causal, levels(n, k), 3)
    for i, edges in enumerate(walk(n, k, causal, 3)):
        cover = torch.zeros(n, dtype=torch.long)
        for lev_, idx_, _ in edges:
            cover[idx_ << lev_: min((idx_ + 1) << lev_, n)] += 1
        want = torch.ones(n, dtype=torch.long)
        if causal:
            want[i + 1:] = 0
        assert torch.equal(cover, want), (i, edges)
        got = sorted((int(a), int(c), int(t)) for a, c, o, t in zip(lev[i], idx[i], ok[i], typ) if o)
        assert got == sorted(edges)
        assert max(e[0] for e in edges) < max(levels(n, k), 1)


@pytest.mark.parametrize("n,k,kv_heads,causal,rel", [(37, 2, None, False, True), (37, 2, 2, True, True),
                                                     (70, 3, 1, False, True), (23, 1, 2, True, False),
                                                     (64, 4, None, True, True), (9, 5, 2, False, False)])
def test_bpt_matches_definition(n, k, kv_heads, causal, rel):
    m, _, _ = make_op("mha", "bpt", d=D, causal=causal, heads=4, kv_heads=kv_heads, k=k, rel_pos=rel, clip=2)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference_bpt(m, x, k, causal, 2, rel)
    assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
    if rel:  # the edge-type vectors are read
        with torch.no_grad():
            m.rel[1] += 1.0
            assert (m(x, Ctx()) - y).abs().max().item() > 1e-6


def test_bpt_with_every_span_a_token_is_softmax_attention():
    """k >= n: every token reads every other one at level 0: exact softmax attention (with no edge types)."""
    m, _, _ = make_op("mha", "bpt", d=D, heads=4, kv_heads=2, k=20, rel_pos=False)
    perturb_params(m)
    x = torch.randn(2, 19, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q, k, v = head_projections(m, x)
    k, v = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)
    w = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(m.head_dim), -1)
    want = output_projection(m, torch.einsum("bhij,bjhd->bihd", w, v).reshape(2, 19, -1))
    with torch.no_grad():
        assert (m(x, Ctx()) - want).abs().max().item() < 1e-10


def test_bpt_causal_does_not_leak():
    m, _, _ = make_op("mha", "bpt", d=D, causal=True, heads=4, kv_heads=2, k=2)
    perturb_params(m)
    assert_no_leak(lambda x: m(x, None), n=29, d=D)


def test_left_padding_is_refused():
    m, _, _ = make_op("mha", "bpt", d=D, heads=4, k=2)
    left = torch.ones(2, 10, dtype=torch.bool)
    left[0, :3] = False
    with pytest.raises(EvoError, match="E409.*right padding"):
        m(torch.randn(2, 10, D, dtype=torch.float64), Ctx(mask=left))


def test_bpt_in_a_model():
    src = ("d_model = 32\nmodel m(causal=true) = input(tokens, vocab=11) -> embed(token) -> mha(bpt, k=2) "
           "-> head(lm)\n")
    ids = torch.randint(0, 11, (2, 21))
    model = evodsl.compile(src)
    assert model(ids).shape == (2, 21, 11)
