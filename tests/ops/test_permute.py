"""pos(permute): PermuteFormer (arXiv:2109.02377) inside mha(linear) and mha(performer), against a float64 reference
from the equation: the weight of key j for query i is r^(i-j) (P^i phi(q_i))·(P^j phi(k_j)) (causal, j <= i) or
(P^i phi(q_i))·(P^j phi(k_j)) (bidirectional), P^t by composing the drawn permutation t times (not the module's
cycle tables), phi from the weights. Shapes: n past the 64-token chunk, GQA; the relative property;
decoding at an offset; padding; refusals."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import decode_in_pieces, head_projections, make_op, output_projection, perturb_params


def features(m, x):
    """phi(q), phi(k) [b, n, H, F] (k at every query head) from the weights."""
    q, k, v = head_projections(m, x)
    g = m.heads // m.kv_heads
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    if hasattr(m, "w"):  # FAVOR+: exp(w x' - |x'|^2 / 2) (its constant 1/sqrt(m) cancels in the ratio)
        c = q.shape[-1] ** -0.25
        phi = lambda t: torch.exp((t * c) @ m.w.T - (t * c).square().sum(-1, keepdim=True) / 2)  # noqa: E731
    else:
        phi = lambda t: F.elu(t) + 1  # noqa: E731
    return phi(q), phi(k), v


def power(perm, t):
    """σ^t as a list: σ^t(c) = σ(σ^(t-1)(c))."""
    out = list(range(len(perm)))
    for _ in range(t):
        out = [int(perm[c]) for c in out]
    return out


def reference(m, x, seed, r, causal, mask=None):
    b, n, _ = x.shape
    fq, fk, v = features(m, x)
    H, Fn = m.heads, fq.shape[-1]
    g = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(Fn, generator=g) for _ in range(H)]
    i, j = torch.arange(n, dtype=x.dtype)[:, None], torch.arange(n, dtype=x.dtype)[None, :]
    o = torch.zeros(b, n, H, v.shape[-1], dtype=x.dtype)
    for h in range(H):
        rh = r if r is not None else 1 / (1 + math.exp(-(2 + 3 * h / H)))
        P = torch.tensor([power(perms[h], t) for t in range(n)]).expand(b, n, Fn)  # σ^t for t = 0..n-1
        w = torch.einsum("bif,bjf->bij", fq[:, :, h].gather(-1, P), fk[:, :, h].gather(-1, P))
        if causal:
            w = w * (rh ** (i - j)).masked_fill(j > i, 0.0)  # r^(i-j), j <= i
        if mask is not None:
            w = w * mask[:, None, :]
        o[:, :, h] = (w @ v[:, :, h]) / (w.sum(-1, keepdim=True) + (0 if hasattr(m, "w") else m.eps))
    return output_projection(m, o.reshape(b, n, -1))


CASES = [("linear", {}, 2, 9), ("linear", {"kv_heads": 2}, 1, 7), ("performer", {"features": 12}, 2, 9),
         ("performer", {"features": 8, "kv_heads": 1}, 1, 6)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant,extra,b,n", CASES)
@pytest.mark.parametrize("r", [None, 0.9])
def test_matches_the_equation(variant, extra, b, n, causal, r):
    seed = 3
    m, _, _ = make_op("mha", variant, d=16, heads=2, causal=causal, pos=("permute", {"r": r, "seed": seed}), **extra)
    perturb_params(m, scale=0.3)
    x = torch.randn(b, n, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(m(x, Ctx()), reference(m, x, seed, r, causal), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("variant,extra", [("linear", {"kv_heads": 2}), ("performer", {"features": 8, "kv_heads": 1})])
def test_matches_the_equation_across_chunks(variant, extra):
    """n = 70: two chunks of 64 (the state decayed by r^64 between them, the last chunk padded)."""
    m, _, _ = make_op("mha", variant, d=16, heads=2, causal=True, pos=("permute", {"seed": 1}), **extra)
    perturb_params(m, scale=0.3)
    x = torch.randn(1, 70, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(m(x, Ctx()), reference(m, x, 1, None, True), rtol=1e-9, atol=1e-10)


def test_the_weights_depend_on_i_minus_j_only():
    """(P^i a)·(P^j b) = a·P^(j−i) b: shifting both positions by t changes no weight (any t, from the cycles)."""
    m, _, _ = make_op("mha", "linear", d=16, heads=2, pos=("permute", {}))
    a, c = torch.rand(2, 8, dtype=torch.float64), torch.rand(2, 8, dtype=torch.float64)
    pos = m.pos

    def weight(i, j):
        pi, pj = pos.powers(i, 1, "cpu")[:, 0], pos.powers(j, 1, "cpu")[:, 0]
        return (a.gather(-1, pi) * c.gather(-1, pj)).sum(-1)

    for i, j in [(0, 3), (5, 2), (7, 7)]:
        for t in (1, 13, 1000):
            torch.testing.assert_close(weight(i + t, j + t), weight(i, j), rtol=1e-14, atol=0)


@pytest.mark.parametrize("variant,extra", [("linear", {"kv_heads": 2}), ("performer", {"features": 12})])
def test_decodes_at_an_offset(variant, extra):
    m, _, _ = make_op("mha", variant, d=16, heads=2, causal=True, pos=("permute", {}), **extra)
    perturb_params(m, scale=0.3)
    x = torch.randn(2, 75, 16, dtype=torch.float64)
    got, _ = decode_in_pieces(m, x, [40, 1, 30, 4])
    torch.testing.assert_close(got, m(x, Ctx()), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("variant", ["linear", "performer"])
def test_padded_keys_add_nothing(variant):
    m, _, _ = make_op("mha", variant, d=16, heads=2, pos=("permute", {}))
    perturb_params(m, scale=0.3)
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    mask = torch.ones(1, 9, dtype=torch.bool)
    mask[0, 6:] = False
    torch.testing.assert_close(m(x, Ctx(mask=mask))[:, :6], reference(m, x, 0, None, False, mask)[:, :6],
                               rtol=1e-9, atol=1e-10)


def test_refusals():
    with pytest.raises(EvoError, match="E302(.|\n)*pos\\(permute\\) works inside: mha\\(linear\\), mha\\(performer\\)"):
        evodsl.compile("model m = input(features, d=32) -> pos(permute) -> mha(softmax)")
    with pytest.raises(EvoError, match="r"):
        evodsl.compile("model m = input(features, d=32) -> pos(permute, r=1.5) -> mha(linear)")
