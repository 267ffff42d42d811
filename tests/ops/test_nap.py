"""mha(nap) against the paper's equation (2005.09561, NAP), in float64 from the module's weights alone: per query i
and head, the scores s_j = q_i . k_j / sqrt(dh) over its keys (causal: j <= i), their mean and (population)
variance, the weights g (s_j - mu) / sqrt(var + eps) + b, the sum of w_j v_j (GQA: head hh reads K/V head
hh // g). Decoding and leaks: test_decode.py, test_leaks.py; padding: test_padding.py."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import head_projections, make_op, output_projection, perturb_params

D = 32


def reference(m, x, causal, eps=1e-6):
    q, k, v = head_projections(m, x)
    b, n, h, dh = q.shape
    g = h // k.shape[2]
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for i in range(n):
        keys = i + 1 if causal else n
        for hh in range(h):
            s = torch.einsum("bd,bjd->bj", q[:, i, hh], k[:, :keys, hh // g]) / math.sqrt(dh)
            mu = s.mean(-1, keepdim=True)
            var = ((s - mu) ** 2).mean(-1, keepdim=True)
            w = m.gain[hh, 0, 0] * (s - mu) / torch.sqrt(var + eps) + m.shift[hh, 0, 0]
            out[:, i, hh] = torch.einsum("bj,bjd->bd", w, v[:, :keys, hh // g])
    return output_projection(m, out.reshape(b, n, h * dh))


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("n, kv_heads, extra", [(13, None, {}), (24, 2, {"eps": 1e-3}), (1, 1, {}),
                                                (7, 1, {"head_dim": 4, "bias": False})])
def test_nap_matches_equation(n, kv_heads, extra, causal):
    m, _, _ = make_op("mha", "nap", d=D, causal=causal, heads=4, kv_heads=kv_heads, **extra)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference(m, x, causal, extra.get("eps", 1e-6))
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        if n > 2:  # the comparison sees the causal statistics
            assert (y - reference(m, x, not causal)).abs().max().item() > 1e-6


def test_weights_are_standardised_rows_not_probabilities():
    """g = 1, b = 0: each row's weights have mean 0 and variance 1 (up to eps): no probability cage."""
    m, _, _ = make_op("mha", "nap", d=D, heads=4, eps=1e-12)
    x = torch.randn(1, 9, D, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = m.qkv(x)
        eye = torch.eye(9, dtype=torch.float64).expand(1, 4, 9, 9)  # V = I reads the weights out
        w = m.attend(q, k, eye, None)
    assert w.mean(-1).abs().max().item() < 1e-12
    assert (w.pow(2).mean(-1) - 1).abs().max().item() < 1e-9
    assert w.min().item() < 0


def test_dropout_and_bad_eps_are_refused():
    src = "d_model = 32\nmodel m(causal=true) = input(tokens, vocab=11) -> embed(token) -> mha(nap{}) -> head(lm)\n"
    with pytest.raises(EvoError, match="no dropout"):
        evodsl.parse(src.format(", dropout=0.1"))
    with pytest.raises(EvoError, match="eps"):
        evodsl.parse(src.format(", eps=0.0"))
