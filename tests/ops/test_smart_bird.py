"""mha(smart_bird) against its defining equations, in float64: the sketch's scores, each head's Gumbel top-s sample of
keys per query (the noise shared with the module: it is the seeded random pattern), and softmax attention over the
sampled pairs, written here with explicit loops; with every key sampled it is dense attention (softmax attention
exactly when the sketch is zero), and its error against that shrinks as s grows; the hash's Gumbel noise samples
from the sketch's distribution; padding (right only), dropout and the causal form refused."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx, OpEnv, ShapeProblem, lookup
from evodsl.ops.attention.smart_bird import gumbel
from ophelpers import head_projections, make_op, output_projection, perturb_params

D = 32


def _linear(layer, x):
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def reference_smart_bird(m, x, s, dense=False):
    """o_i^h = sum_{j in S_hi} softmax(q_i^h . k_j^h / sqrt(dh) + c_ij) v_j^h, S_hi the s largest c_ij + g_hij;
    dense: every key (S_hi = all j)."""
    b, n, _ = x.shape
    h, g, dh = m.heads, m.kv_heads, m.head_dim
    q, k, v = head_projections(m, x)
    c = torch.einsum("bie,bje->bij", _linear(m.sketch_q, x), _linear(m.sketch_k, x)) / math.sqrt(m.e)
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for hh in range(h):
        noise = gumbel(m.seed, hh, n, x.device, x.dtype)
        kh, vh = k[:, :, hh // (h // g)], v[:, :, hh // (h // g)]
        for bb in range(b):
            for i in range(n):
                keys = range(n) if dense else torch.argsort(c[bb, i] + noise[i], descending=True)[:min(s, n)].tolist()
                scores = torch.stack([q[bb, i, hh] @ kh[bb, j] / math.sqrt(dh) + c[bb, i, j] for j in keys])
                w = torch.exp(scores - scores.max())
                w = w / w.sum()
                out[bb, i, hh] = sum(w[t] * vh[bb, j] for t, j in enumerate(keys))
    return output_projection(m, out.reshape(b, n, h * dh))


@pytest.mark.parametrize("n,s,kv_heads,e", [(20, 4, None, 8), (17, 5, 2, 3), (9, 16, 1, 16), (33, 1, None, 4)])
def test_smart_bird_matches_equation(n, s, kv_heads, e):
    m, _, _ = make_op("mha", "smart_bird", d=D, heads=4, kv_heads=kv_heads, s=s, e=e, seed=n)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference_smart_bird(m, x, s)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        if s < n:  # heads sample different keys
            idx = m.sample(torch.zeros(1, n, n, dtype=x.dtype), n)
            assert not torch.equal(idx[..., 0, :], idx[..., 1, :])


def test_every_key_sampled_is_dense_attention_and_the_error_shrinks_with_s():
    n = 24
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    errs = []
    for s in (4, 12, 20, n):
        m, _, _ = make_op("mha", "smart_bird", d=D, heads=4, s=s, e=8)
        perturb_params(m)
        with torch.no_grad():
            dense = reference_smart_bird(m, x, s, dense=True)
            errs.append(((m(x, Ctx()) - dense).norm() / dense.norm()).item())
    assert errs[0] > errs[1] > errs[2] > 1e-6 and errs[3] < 1e-12, errs
    m, _, _ = make_op("mha", "smart_bird", d=D, heads=4, kv_heads=2, s=n)
    perturb_params(m)
    with torch.no_grad():  # a zero sketch: softmax attention itself
        m.sketch_q.weight.zero_()
        m.sketch_q.bias.zero_()
        q, k, v = (t.transpose(1, 2) for t in head_projections(m, x))
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        w = (q @ k.transpose(-1, -2) / math.sqrt(m.head_dim)).softmax(-1)
        want = output_projection(m, (w @ v).transpose(1, 2).reshape(2, n, -1))
        assert (m(x, Ctx()) - want).abs().max().item() < 1e-12


def test_the_noise_samples_from_the_sketch_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, 1.5], dtype=torch.float64)
    p = logits.softmax(0)
    draws = 4000
    counts = torch.zeros(6, dtype=torch.float64)
    for seed in range(draws):
        counts[(logits + gumbel(seed, 0, 6, "cpu", torch.float64)[3]).argmax()] += 1
    assert (counts / draws - p).abs().max().item() < 4 * math.sqrt(0.25 / draws)  # ~4 standard errors


def test_training_draws_fresh_samples_and_eval_repeats():
    m, _, _ = make_op("mha", "smart_bird", d=D, heads=4, s=3)
    perturb_params(m)
    x = torch.randn(1, 30, D, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(m(x, Ctx()), m(x, Ctx()))
        m.train()
        assert not torch.allclose(m(x, Ctx()), m(x, Ctx()))


def test_left_padding_dropout_and_causal_are_refused():
    m, _, _ = make_op("mha", "smart_bird", d=D, heads=4, s=3)
    left = torch.ones(2, 10, dtype=torch.bool)
    left[0, :3] = False
    with pytest.raises(EvoError, match="E409.*right padding"):
        m(torch.randn(2, 10, D, dtype=torch.float64), Ctx(mask=left))
    op = lookup("mha", "smart_bird")
    with pytest.raises(ShapeProblem, match="no dropout"):
        op.shape(op.params(dropout=0.1), OpEnv(in_shapes=(("b", "n", D),)))
    src = "d_model = 32\nmodel m(causal=true) = input(tokens, vocab=11) -> embed(token) -> mha(smart_bird) -> head(lm)\n"
    with pytest.raises(EvoError, match="E301"):
        evodsl.parse(src)
