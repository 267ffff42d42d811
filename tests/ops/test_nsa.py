"""mha(nsa) against its defining equations, in float64, query by query: the compressed blocks phi(k_{id..id+l-1})
written from the MLP's weights; p_cmp over the blocks that end at or before the query; the selection importance
as the overlap of each compression block with each selection block (in stride-d segments), summed over a GQA
group; the initial and two local blocks, then the best others, topk in all; softmax over the selected blocks'
tokens and over the window; the gated sum. A second test holds the importance -> top-n rule to the paper's
double sum (eq. 9) literally. Leaks, padding, decoding and the export: the shared harnesses."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_no_leak, head_projections, make_op, output_projection, perturb_params
from evodsl.ops.attention._nsa_branches import selection_importance

D = 32


def phi(comp, t):
    """t [b, l, dh] -> [b, dh]: W2 relu(W1 vec(t + P) + b1) + b2."""
    z = (t + comp.pos).flatten(1) @ comp.fc1.weight.T + (0 if comp.fc1.bias is None else comp.fc1.bias)
    return torch.relu(z) @ comp.fc2.weight.T + (0 if comp.fc2.bias is None else comp.fc2.bias)


def attend(qv, keys, vals, scale):
    """One query vector [b, dh] over keys, vals [b, S, dh]."""
    w = (torch.einsum("bd,bsd->bs", qv, keys) * scale).softmax(-1)
    return torch.einsum("bs,bsd->bd", w, vals)


def reference(m, x, causal, selection=None):
    """The output [b, n, d], and per (batch, K/V head, query) the blocks selected and the importance of every
    readable block; `selection` given, those blocks are used instead of the reference's own ranking."""
    q, k, v = head_projections(m, x)
    b, n, h, dh = q.shape
    kv = k.shape[2]
    g, l, d, L, w = h // kv, m.block, m.stride, m.select, m.window
    scale = 1 / math.sqrt(dh)
    M = (n - l) // d + 1 if n >= l else 0
    kc = [[phi(m.k_compress, k[:, i * d:i * d + l, c]) for c in range(kv)] for i in range(M)]
    vc = [[phi(m.v_compress, v[:, i * d:i * d + l, c]) for c in range(kv)] for i in range(M)]
    gate = torch.sigmoid(x @ m.gate.weight.T + (0 if m.gate.bias is None else m.gate.bias)).view(b, n, 3, h)
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    chosen, ranked = {}, {}
    for t in range(n):
        last = t if causal else n - 1
        blocks = [i for i in range(M) if i * d + l - 1 <= last]
        o_cmp = torch.zeros(b, h, dh, dtype=x.dtype)
        p_cmp = torch.zeros(b, h, M, dtype=x.dtype)
        for hh in range(h):
            if blocks:
                ks = torch.stack([kc[i][hh // g] for i in blocks], 1)
                vs = torch.stack([vc[i][hh // g] for i in blocks], 1)
                p = (torch.einsum("bd,bsd->bs", q[:, t, hh], ks) * scale).softmax(-1)
                p_cmp[:, hh, blocks] = p
                o_cmp[:, hh] = torch.einsum("bs,bsd->bd", p, vs)
        J = -(-n // L)
        valid = [j for j in range(J) if j * L <= last]
        own = t // L
        for bb in range(b):
            for c in range(kv):
                imp = {j: sum(p_cmp[bb, c * g:(c + 1) * g, i].sum().item()
                              * (max(0, min(i * d + l, (j + 1) * L) - max(i * d, j * L)) // d)
                              for i in range(M)) for j in valid}
                forced = [j for j in valid if j in (0, own, own - 1)]
                rest = sorted((j for j in valid if j not in forced), key=lambda j: -imp[j])
                sel = sorted(forced + rest[:m.topk - len(forced)]) if selection is None else selection[bb, c, t]
                chosen[bb, c, t], ranked[bb, c, t] = sel, (forced, imp)
                toks = [r for j in sel for r in range(j * L, min((j + 1) * L, n)) if r <= last]
                near = [r for r in range(n) if (t - w < r <= t if causal else abs(t - r) < w)]
                for hh in range(c * g, (c + 1) * g):
                    o_slc = attend(q[bb:bb + 1, t, hh], k[bb:bb + 1, toks, c], v[bb:bb + 1, toks, c], scale)
                    o_win = attend(q[bb:bb + 1, t, hh], k[bb:bb + 1, near, c], v[bb:bb + 1, near, c], scale)
                    gg = gate[bb, t, :, hh]
                    out[bb, t, hh] = gg[0] * o_cmp[bb, hh] + gg[1] * o_slc[0] + gg[2] * o_win[0]
    return output_projection(m, out.reshape(b, n, h * dh)), chosen, ranked


def module_selection(m, x, causal):
    """The blocks the module selects, per (batch, K/V head, query), from its own importance."""
    q, k, v = m.qkv(x)
    b, h, n, dh = q.shape
    from evodsl.ops.attention._nsa_branches import compressed_attention, compressed_count
    M = compressed_count(n, m.block, m.stride)
    kc, vc = m.k_compress(k, 0, M, m.stride), m.v_compress(v, 0, M, m.stride)
    t = torch.arange(n)
    last = t if causal else torch.full_like(t, n - 1)
    _, p = compressed_attention(m, q, kc, vc, last, None)
    imp, valid = selection_importance(m, p, n, t, last, None)
    idx = imp.topk(m.topk, dim=-1).indices
    ok = valid.expand(b, m.kv_heads, n, -1).gather(3, idx)
    return {(bb, c, tt): sorted(j for j, o in zip(idx[bb, c, tt].tolist(), ok[bb, c, tt].tolist()) if o)
            for bb in range(b) for c in range(m.kv_heads) for tt in range(n)}


CASES = [  # causal, (l, d, l', topk, w), n, kv_heads
    (True, (4, 2, 4, 3, 5), 23, None), (False, (4, 2, 4, 3, 5), 23, 2),  # l = l': p_slc from overlapping blocks
    (True, (4, 2, 8, 4, 6), 37, 2), (False, (4, 2, 8, 4, 6), 37, None),  # l' = 2 l (the paper's ratio)
    (True, (6, 3, 6, 3, 4), 29, 1), (True, (2, 2, 4, 5, 3), 30, 2),  # d = l (no overlap), many blocks selected
    (True, (8, 4, 8, 3, 5), 6, 2), (False, (8, 4, 8, 3, 5), 6, None),  # n < l: no compressed block at all
    (True, (4, 2, 8, 3, 40), 19, None),  # a window past n
]


@pytest.mark.parametrize("causal, sizes, n, kv_heads", CASES)
def test_nsa_matches_equation(causal, sizes, n, kv_heads):
    l, d, L, topk, w = sizes
    m, _, _ = make_op("mha", "nsa", d=D, causal=causal, heads=4, kv_heads=kv_heads, block=l, stride=d,
                      select_block=L, topk=topk, window=w)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        mine = module_selection(m, x, causal)
        ref, _, ranked = reference(m, x, causal, selection=mine)  # the module's own selection, fixed
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
    for key, sel in mine.items():  # and it is a top-n by the reference's importance (ties: either side)
        forced, imp = ranked[key]
        assert set(forced) <= set(sel) and len(sel) == min(m.topk, len(imp)), key
        rest = [j for j in imp if j not in forced]
        picked, left = [imp[j] for j in rest if j in sel], [imp[j] for j in rest if j not in sel]
        if picked and left:
            assert min(picked) >= max(left) - 1e-12, key
    if kv_heads != 1 and n > 2 * L:  # the comparison sees the selection: another choice changes the output
        other = {key: sel[:-1] + [j for j in ranked[key][1] if j not in sel][:1] for key, sel in mine.items()}
        with torch.no_grad():
            assert (y - reference(m, x, causal, selection=other)[0]).abs().max().item() > 1e-6


def paper_importance(p_cmp, l, d, L, J):
    """Eq. 9, literally: p_slc[j] = sum_{m < l'/d} sum_{n < l/d} p_cmp[(l'/d) j + m - n] (blocks out of range: 0)."""
    M = p_cmp.shape[-1]
    out = torch.zeros(*p_cmp.shape[:-1], J, dtype=p_cmp.dtype)
    for j in range(J):
        for a in range(L // d):
            for c in range(l // d):
                i = (L // d) * j + a - c
                if 0 <= i < M:
                    out[..., j] += p_cmp[..., i]
    return out


@pytest.mark.parametrize("l, d, L", [(4, 2, 8), (4, 2, 4), (6, 2, 4), (3, 3, 6)])
def test_importance_and_top_n_rule(l, d, L):
    """The importance is eq. 9 summed over each GQA group; the forced blocks (0, the query's own, the one before)
    come first, then the highest importance; blocks starting after the query never."""
    m, _, _ = make_op("mha", "nsa", d=D, causal=True, heads=4, kv_heads=2, block=l, stride=d, select_block=L,
                      topk=4, window=4)
    n, M = 40, (40 - l) // d + 1
    g = torch.Generator().manual_seed(3)
    p = torch.rand(2, 4, n, M, generator=g, dtype=torch.float64)
    t = torch.arange(n)
    imp, valid = selection_importance(m, p, n, t, t, None)
    J = -(-n // L)
    want = paper_importance(p.view(2, 2, 2, n, M).sum(2), l, d, L, J)
    for tt in range(n):
        for j in range(imp.shape[-1]):
            v = imp[:, :, tt, j]
            if j * L > tt or j >= J:
                assert (v == float("-inf")).all() and not valid[0, 0, tt, j]
            elif j in (0, tt // L, tt // L - 1):
                assert (v == float("inf")).all()
            else:
                assert torch.allclose(v, want[:, :, tt, j], rtol=1e-12, atol=0)
    idx = imp.topk(4, dim=-1).indices
    for tt in range(n):
        top = set(idx[0, 0, tt].tolist())
        forced = {j for j in (0, tt // L, tt // L - 1) if j >= 0}
        assert forced <= top
        others = sorted((j for j in range(J) if j * L <= tt and j not in forced), key=lambda j: -want[0, 0, tt, j])
        assert set(others[:4 - len(forced)]) <= top


def test_causal_does_not_leak_and_bidirectional_does():
    m, _, _ = make_op("mha", "nsa", d=D, causal=True, heads=4, kv_heads=2, block=4, stride=2, select_block=8,
                      topk=3, window=5)
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=40, d=D)
    m, _, _ = make_op("mha", "nsa", d=D, causal=False, heads=4, block=4, stride=2, select_block=8, topk=3, window=5)
    perturb_params(m)
    with torch.no_grad(), pytest.raises(AssertionError, match="changed by"):
        assert_no_leak(lambda x: m(x, Ctx()), n=20, d=D)


@pytest.mark.parametrize("build, message", [
    ({"block": 5, "stride": 2}, "block=5 is not a multiple of stride=2"),
    ({"block": 4, "stride": 2, "select_block": 5}, "select_block=5 is not a multiple of stride=2"),
    ({"dropout": 0.1}, "no dropout"),
])
def test_validation_errors(build, message):
    import evodsl

    args = ", ".join(f"{k}={v}" for k, v in build.items())
    with pytest.raises(EvoError, match=message):
        evodsl.compile(f"d_model = 32\nmodel m(causal=true) = input(tokens, vocab=11) -> embed -> mha(nsa, {args}) "
                       f"-> head(lm)\n")


def test_topk_below_three_is_refused():
    import evodsl

    with pytest.raises(EvoError, match="topk"):
        evodsl.compile("d_model = 32\nmodel m(causal=true) = input(tokens, vocab=11) -> embed -> mha(nsa, topk=2) "
                       "-> head(lm)\n")


@pytest.mark.parametrize("causal", [False, True])
def test_left_padding_is_refused(causal):
    m, _, _ = make_op("mha", "nsa", d=D, causal=causal, heads=4, block=4, stride=2, select_block=4, topk=3, window=4)
    x = torch.randn(2, 10, D, dtype=torch.float64)
    left = torch.ones(2, 10, dtype=torch.bool)
    left[0, :3] = False
    with pytest.raises(EvoError, match="E409.*right padding"):
        m(x, Ctx(mask=left))


@pytest.mark.parametrize("causal", [False, True])
def test_selection_of_every_block_is_softmax_attention(causal):
    """topk l' >= n selects every block, so the selection branch is softmax attention over every key (causal: keys
    0 .. t); with the gates at (0, 1, 0) (sigmoid of -40, 40, -40: 4e-18 from exact) the op is mha(softmax)."""
    m, _, _ = make_op("mha", "nsa", d=D, causal=causal, heads=4, kv_heads=2, block=4, stride=2, select_block=4,
                      topk=8, window=3)
    s, _, _ = make_op("mha", "softmax", d=D, causal=causal, heads=4, kv_heads=2)
    perturb_params(m)
    perturb_params(s)
    m.load_state_dict(s.state_dict(), strict=False)
    with torch.no_grad():
        m.gate.weight.zero_()
        m.gate.bias.copy_(torch.tensor([-40.0, 40.0, -40.0], dtype=torch.float64).repeat_interleave(4))
        x = torch.randn(2, 29, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        want = s(x, Ctx())
        assert (m(x, Ctx()) - want).abs().max().item() < 1e-12 * want.abs().max().item()


@pytest.mark.parametrize("causal, kv_heads, padded", [(True, 2, False), (False, None, True), (True, 1, True)])
def test_selection_chunks_and_recomputing_backward(causal, kv_heads, padded):
    """The selection branch in chunks of CHUNK queries with its recomputing backward equals the one-piece gather
    under autograd (float64), outputs and the gradients of q, k, v, at n over several chunks, GQA, padding."""
    from evodsl.ops.attention import _nsa_select as sel
    m, _, _ = make_op("mha", "nsa", d=D, causal=causal, heads=4, kv_heads=kv_heads, block=4, stride=2,
                      select_block=8, topk=3, window=5)
    g = torch.Generator().manual_seed(7)
    b, n, dh, kv = 2, 2 * sel.CHUNK + 21, m.head_dim, m.kv_heads
    q = torch.randn(b, m.heads, n, dh, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(b, kv, n, dh, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    t = torch.arange(n)
    last = t if causal else torch.full_like(t, n - 1)
    key_mask = None
    if padded:
        key_mask = torch.ones(b, n, dtype=torch.bool)
        key_mask[1, n - 30:] = False
    J = -(-n // 8) + 3
    start = torch.arange(J) * 8
    valid = ((start[None, :] <= last[:, None]) & (start[None, :] < n))[None, None]
    if key_mask is not None:
        valid = valid & key_mask[:, start.clamp(max=n - 1)][:, None, None, :]
    imp = torch.rand(b, kv, n, J, generator=g, dtype=torch.float64).masked_fill(~valid, float("-inf"))
    idx = imp.topk(3, dim=-1).indices
    do = torch.randn(b, m.heads, n, dh, generator=g, dtype=torch.float64)
    outs = []
    for f in (sel.selected_attention, sel._attend):
        o = f(m, q, k, v, idx, valid, t, last, key_mask)
        outs.append((o, *torch.autograd.grad(o, (q, k, v), do)))
    for a, r in zip(*outs):
        assert (a - r).abs().max().item() < 1e-12 * max(r.abs().max().item(), 1.0)
    assert outs[0][2].abs().max().item() > 0.1  # the keys' gradient reaches them (scatter-add)
