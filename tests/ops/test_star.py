"""mha(star) against the Star-Transformer's Algorithm 1, in float64, written per token with explicit loops: h^0 = e
(the input), s^0 = the mean of the tokens, each round h_i <- LN(ReLU(MultiAtt(h_i, [h_{i-1}; h_i; h_{i+1}; e_i;
s]))) on a closed ring, then (between rounds) s <- LN(ReLU(MultiAtt(s, [s; H]))); padding closes the ring over
each sequence's tokens (a padded batch equals each sequence alone: here and in test_padding.py); no causal
form, no dropout."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx, OpEnv, ShapeProblem, lookup
from ophelpers import head_projections, make_op, output_projection, perturb_params

D = 32


def _lin(layer, t):
    return t @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def _ln(norm, t):
    mu = t.mean(-1, keepdim=True)
    return (t - mu) / torch.sqrt(((t - mu) ** 2).mean(-1, keepdim=True) + norm.eps) * norm.weight + norm.bias


def _multiatt(q, k, v, h, g):
    """One query q [h, dh] over keys and values k, v [m, g, dh] -> [h * dh]."""
    dh = q.shape[-1]
    out = []
    for hh in range(h):
        kh = hh // (h // g)
        s = torch.stack([q[hh] @ k[j, kh] for j in range(k.shape[0])]) / math.sqrt(dh)
        w = torch.exp(s - s.max())
        out.append(sum(wj * v[j, kh] for j, wj in enumerate(w / w.sum())))
    return torch.cat(out)


def reference_star(m, x, rounds):
    """One sequence x [n, d] (its tokens only)."""
    n, d = x.shape
    h, g, dh = m.heads, m.kv_heads, m.head_dim
    atts = [m, *m.rings]
    H, s = x, x.mean(0)
    for t, att in enumerate(atts):
        if t == 0:  # the first round through the shared test helpers
            q, k, v = (p[0] for p in head_projections(m, x[None]))
            ke, ve = k, v
        else:
            q = _lin(att.q_proj, H).view(n, h, dh)
            k, v = _lin(att.k_proj, H).view(n, g, dh), _lin(att.v_proj, H).view(n, g, dh)
            ke, ve = _lin(att.k_proj, x).view(n, g, dh), _lin(att.v_proj, x).view(n, g, dh)
        ks, vs = _lin(att.k_proj, s).view(g, dh), _lin(att.v_proj, s).view(g, dh)
        rows = []
        for i in range(n):
            ring = [(i - 1) % n, i, (i + 1) % n]
            kc = torch.stack([k[j] for j in ring] + [ke[i], ks])
            vc = torch.stack([v[j] for j in ring] + [ve[i], vs])
            rows.append(_multiatt(q[i], kc, vc, h, g))
        o = torch.stack(rows)
        H = _ln(att.norm, torch.relu(output_projection(m, o) if t == 0 else _lin(att.o_proj, o)))
        if t + 1 < rounds:
            r = m.relays[t]
            c = torch.cat([s[None], H])
            a = _multiatt(_lin(r.q_proj, s).view(h, dh), _lin(r.k_proj, c).view(n + 1, g, dh),
                          _lin(r.v_proj, c).view(n + 1, g, dh), h, g)
            s = _ln(r.norm, torch.relu(_lin(r.o_proj, a)))
    return H


@pytest.mark.parametrize("n,rounds,kv_heads,bias", [(11, 1, None, True), (7, 3, 2, True), (2, 2, 1, False),
                                                    (1, 1, None, True), (16, 2, 2, False)])
def test_star_matches_algorithm(n, rounds, kv_heads, bias):
    m, _, _ = make_op("mha", "star", d=D, heads=4, kv_heads=kv_heads, rounds=rounds, bias=bias)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        for i in range(2):
            ref = reference_star(m, x[i], rounds)
            assert (y[i] - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        if n > 3:  # the ring is closed: the first token reads the last (and, past one round, the relay all)
            x2 = x.clone()
            x2[:, -1] += 1.0
            assert (m(x2, Ctx())[:, 0] - y[:, 0]).abs().max().item() > 1e-6


def test_star_padding_closes_the_ring_over_the_tokens():
    m, _, _ = make_op("mha", "star", d=D, heads=4, kv_heads=2, rounds=2)
    perturb_params(m)
    x = torch.randn(3, 9, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    keep = torch.ones(3, 9, dtype=torch.bool)
    keep[0, 5:] = False  # right padding
    keep[1, :3] = False  # left padding
    keep[2, 1:8] = False  # two tokens, padding between them
    with torch.no_grad():
        y = m(x, Ctx(mask=keep))
        assert torch.isfinite(y).all()
        for i in range(3):
            ref = reference_star(m, x[i, keep[i]], 2)
            assert (y[i, keep[i]] - ref).abs().max().item() < 1e-10 * ref.abs().max().item()


def test_star_has_no_causal_form_nor_dropout():
    src = "d_model = 32\nmodel m(causal=true) = input(tokens, vocab=11) -> embed(token) -> mha(star) -> head(lm)\n"
    with pytest.raises(EvoError, match="E301"):
        evodsl.parse(src)
    op = lookup("mha", "star")
    with pytest.raises(ShapeProblem, match="no dropout"):
        op.shape(op.params(dropout=0.1), OpEnv(in_shapes=(("b", "n", D),)))
