"""mha(performer) against its defining equation in float64 (the module's own draw W shared with the reference:
the one allowed sharing), written with explicit einsums; its approximation of softmax attention (the error
shrinks as the features grow) and the unbiasedness of its features over many draws; the draw (orthogonal
blocks, in the module's state); the max-subtraction keeping float32 finite; refusals."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

import evodsl
from evodsl import EvoError
from evodsl.ops import OpEnv, ShapeProblem, load_all, lookup
from evodsl.ops.attention.performer import favor_logits, orthogonal_gaussian
from ophelpers import head_projections, make_op, output_projection, perturb_params

D = 32


def _x(b: int, n: int, seed: int = 3, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(b, n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _rotate(t: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """RoFormer's rotation of t [b, n, h, dh]: pair (2i, 2i+1) at position p turns by p * base^(-2i/dh)."""
    n, dh = t.shape[1], t.shape[-1]
    out = t.clone()
    for i in range(dh // 2):
        ang = (torch.arange(n, dtype=torch.float64) * base ** (-2 * i / dh))[:, None]
        c, s = torch.cos(ang), torch.sin(ang)
        out[..., 2 * i] = t[..., 2 * i] * c - t[..., 2 * i + 1] * s
        out[..., 2 * i + 1] = t[..., 2 * i] * s + t[..., 2 * i + 1] * c
    return out


def reference(m, x, causal: bool, rope: bool = False):
    """phi(x) = exp(W x' - |x'|^2/2) / sqrt(m), x' = x / dh^{1/4}; out_i = sum_j A_ij v_j / sum_j A_ij with
    A_ij = phi(q_i)^T phi(k_j) (j <= i when causal): no stabilisation, nothing of the module's but W."""
    q, k, v = head_projections(m, x)  # [b, n, h, dh], [b, n, kv, dh]
    if rope:
        q, k = _rotate(q), _rotate(k)
    b, n, h, dh = q.shape
    W, M = m.w.double(), m.w.shape[0]

    def phi(t):
        t = t / dh ** 0.25
        return torch.exp(torch.einsum("bnd,md->bnm", t, W) - (t * t).sum(-1, keepdim=True) / 2) / math.sqrt(M)

    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for hh in range(h):
        g = hh // (m.heads // m.kv_heads)
        A = torch.einsum("bim,bjm->bij", phi(q[:, :, hh]), phi(k[:, :, g]))
        if causal:
            A = A.tril()
        out[:, :, hh] = torch.einsum("bij,bjd->bid", A, v[:, :, g]) / A.sum(-1, keepdim=True)
    return output_projection(m, out.reshape(b, n, h * dh))


def softmax_reference(m, x, causal: bool):
    """Exact softmax attention over the same projections: softmax(q k^T / sqrt(dh)) v."""
    q, k, v = head_projections(m, x)
    b, n, h, dh = q.shape
    g = m.heads // m.kv_heads
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(dh)
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    o = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v)
    return output_projection(m, o.reshape(b, n, h * dh))


def _close(y, ref, rtol=1e-10):
    assert (y - ref).abs().max().item() <= rtol * ref.abs().max().item()


CASES = [  # (n, chunk, heads, kv_heads, features)
    (100, 64, 4, 4, 32),  # two chunks, n not a multiple of the chunk
    (20, 64, 4, 4, 20),  # n < chunk; m not a multiple of dh (8)
    (29, 8, 4, 2, 24),  # many chunks, grouped K/V heads
    (37, 8, 4, 1, 5),  # multi-query, m < dh
    (64, 16, 2, 2, 16),  # n a multiple of the chunk
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("n,chunk,heads,kv_heads,features", CASES)
def test_performer_equation(causal, n, chunk, heads, kv_heads, features):
    m, _, _ = make_op("mha", "performer", d=D, causal=causal, heads=heads, kv_heads=kv_heads, features=features)
    m.chunk = chunk
    perturb_params(m)
    x = _x(2, n)
    with torch.no_grad():
        _close(m(x, None), reference(m, x, causal))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_performer_rope(causal):
    m, _, _ = make_op("mha", "performer", d=D, causal=causal, heads=4, kv_heads=2, features=16, pos=("rope", {}))
    m.chunk = 8
    perturb_params(m)
    x = _x(2, 29)
    with torch.no_grad():
        want = reference(m, x, causal, rope=True)
        _close(m(x, None), want)
        assert (want - reference(m, x, causal)).abs().max() > 1e-3  # the rotation matters


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_estimate_of_softmax_improves_with_features(causal):
    """Small-norm q, k (projections scaled to 0.08, |q / dh^{1/4}|^2 ~ 0.6): the mean relative error against
    exact softmax attention, averaged over 4 draws, is at m = 1024 under a quarter of that at m = 16 (Monte
    Carlo error ~ 1/sqrt(m), a factor 8; measured ~6), and under 5% there."""
    x = _x(2, 24, seed=5)
    err = {}
    for m_feat in (16, 1024):
        total = 0.0
        for seed in range(4):
            m, _, _ = make_op("mha", "performer", d=D, causal=causal, heads=4, features=m_feat, seed=seed)
            perturb_params(m, seed=11, scale=0.08)  # the same projections for every draw
            with torch.no_grad():
                want = softmax_reference(m, x, causal)
                total += ((m(x, None) - want).abs().mean() / want.abs().mean()).item()
        err[m_feat] = total / 4
    assert err[1024] < err[16] / 4 and err[1024] < 0.05, err
    assert err[16] > 0.05, err  # the estimate is not exact: there is something to shrink


def test_features_are_unbiased():
    """E[phi(q)^T phi(k)] = exp(q^T k / sqrt(dh)) over the draws of W (orthogonal blocks, chi norms): the mean of
    3000 draws is within 4 standard errors of it, and that standard error is under 2% of it."""
    g = torch.Generator().manual_seed(0)
    dh, m_feat = 8, 12  # one full orthogonal block and part of a second
    q, k = torch.randn(2, dh, generator=g, dtype=torch.float64) * 0.5
    est = torch.stack([(favor_logits(q, w).exp() * favor_logits(k, w).exp()).sum()
                       for w in (orthogonal_gaussian(m_feat, dh, generator=g) for _ in range(3000))])
    want = math.exp(q @ k / math.sqrt(dh))
    se = est.std().item() / math.sqrt(len(est))
    assert se < 0.02 * want
    assert abs(est.mean().item() - want) < 4 * se, (est.mean().item(), want, se)


def test_draw_is_orthogonal_and_part_of_the_module_state():
    w = orthogonal_gaussian(20, 8, generator=torch.Generator().manual_seed(1))
    u = w / w.norm(dim=1, keepdim=True)
    torch.testing.assert_close(u[:8] @ u[:8].T, torch.eye(8, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(u[8:16] @ u[8:16].T, torch.eye(8, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (w.norm(dim=1) - 8 ** 0.5).abs().max() > 0.1  # chi-distributed lengths, not all sqrt(dh)
    m1, _, _ = make_op("mha", "performer", d=D, features=16, seed=0)
    m2, _, _ = make_op("mha", "performer", d=D, features=16, seed=0)
    m3, _, _ = make_op("mha", "performer", d=D, features=16, seed=1)
    assert "w" in m1.state_dict() and torch.equal(m1.w, m2.w) and not torch.equal(m1.w, m3.w)
    m3.load_state_dict(m1.state_dict())  # a saved module reproduces: the draw travels with the weights
    x = _x(1, 9)
    with torch.no_grad():
        assert torch.equal(m3(x, None), m1(x, None))


@pytest.mark.parametrize("causal,scale", [(True, 2.0), (False, 4.0)], ids=["causal", "bidirectional"])
def test_stabilisation_keeps_float32_finite(causal, scale):
    """Large inputs, whose feature logits fall to -100 and below (exp underflows to 0 in float32 past -104, so
    that unstabilised, whole rows of phi(q) vanish): subtracting the max before exp keeps the float32 module
    finite and equal to the float64 one, the max cancelling in num / den. (Causal, the keys' constant is their
    max over the whole sequence, as in the authors' code: an early position whose keys' logits lie ~ 87 below a
    later key's would underflow in float32, hence a smaller spread there.)"""
    m, _, _ = make_op("mha", "performer", d=D, causal=causal, heads=2, features=32, dtype=torch.float64)
    m.chunk = 8
    perturb_params(m)
    x = _x(2, 21, scale=scale)
    with torch.no_grad():
        logits = favor_logits(m.q_proj(x).view(2, 21, 2, 16).transpose(1, 2), m.w)
        assert (logits.float().exp().sum(-1) == 0).any()  # rows that unstabilised would be 0 / 0
        want = m(x, None)
        got = m.float()(x.float(), None).double()
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 1e-3 * want.abs().max()


def test_params_and_refusals():
    load_all()
    op = lookup("mha", "performer")
    assert op.causal == "yes" and op.supports == frozenset({"rope", "permute"}) and op.decode_form(None)
    with pytest.raises(ValidationError):
        op.params(features=0)
    with pytest.raises(ShapeProblem) as e:
        op.shape(op.params(dropout=0.1), OpEnv(in_shapes=(("b", "n", D),)))
    assert e.value.field == "dropout"
    for pos in ("alibi", "t5_bias, heads=4"):  # score biases have no place in phi(Q) (phi(K)^T V)
        src = (f"d_model = 32\nmodel m(causal=true) = input(tokens, vocab=11) -> embed(token) -> pos({pos}) "
               f"-> mha(performer, heads=4) -> head(lm)\n")
        with pytest.raises(EvoError, match=r"E302.*cannot apply pos"):
            evodsl.parse(src)
