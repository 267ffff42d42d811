"""pos(equivariant_kernel): translation-equivariant positions in kernelized attention (arXiv:2102.07680) inside
mha(linear), against a float64 reference from the equations over the [n, n] weights (scores, then the
normalisation), not the module's sums:
  rotation  w_ij = phi(q_i)·phi(k_j) + sum_s (a_hs cos(w_s (i - j)) + b_hs sin(w_s (i - j))) + sum_s |(a_hs, b_hs)|
  clipped   w_ij = phi(q_i)·phi(k_j) + phi(q_i)·phi(r_h,clip(j - i, k))
and o_i = sum_j w_ij v_j / (sum_j w_ij + eps) (causal: j <= i). Shapes: n within one chunk and past several (the
64-token chunks, the clip window), GQA; the paper's claim (every position shifted by s: the same outputs);
decoding (pieces == training form, constant state == the cost's kv_cache); padding; refusals."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import evodsl
from evodsl import EvoError
from evodsl.decode import DecodeState
from evodsl.ops import Ctx
from ophelpers import (assert_decodes_with_constant_state, decode_in_pieces, head_projections, make_op,
                       output_projection, perturb_params)


def reference(m, x, causal, mask=None):
    b, n, _ = x.shape
    q, k, v = head_projections(m, x)
    g = m.heads // m.kv_heads
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    phi = lambda t: F.elu(t) + 1  # noqa: E731
    w = torch.einsum("bihf,bjhf->bhij", phi(q), phi(k))
    i, j = torch.arange(n, dtype=torch.float64)[:, None], torch.arange(n, dtype=torch.float64)[None, :]
    pos = m.pos
    if pos.method == "rotation":
        angle = (i - j)[None, None] * pos.omega[None, :, None, None]  # [1, m, n, n]
        a, bb = pos.alpha[:, :, None, None], pos.beta[:, :, None, None]
        rho = torch.sqrt(pos.alpha ** 2 + pos.beta ** 2).sum(-1)
        w = w + ((a * torch.cos(angle) + bb * torch.sin(angle)).sum(1) + rho[:, None, None])[None]
    else:
        K = pos.k
        t = (j - i).long().clamp(-K, K) + K  # [n, n]
        fr = phi(pos.r)[:, t]  # [h, n, n, dh]: phi(r_clip(j - i)) for every pair
        w = w + torch.einsum("bihf,hijf->bhij", phi(q), fr)
    if causal:
        w = w.masked_fill(j > i, 0.0)
    if mask is not None:
        w = w * mask[:, None, None, :]
    o = torch.einsum("bhij,bjhc->bihc", w / (w.sum(-1)[..., None] + m.eps), v)
    return output_projection(m, o.reshape(b, n, -1))


ROT, CLIP = ("rotation", {}), ("clipped", {"clip": 3})
CASES = [(ROT, {}, 2, 9), (ROT, {"kv_heads": 1}, 1, 70), (CLIP, {}, 2, 5), (CLIP, {"kv_heads": 1, "bias": False}, 1, 70),
         (("rotation", {"scales": 2, "max_timescale": 50.0}), {}, 1, 17), (("clipped", {"clip": 1}), {}, 1, 13)]


def build(method, causal, extra=None, **more):
    m, _, _ = make_op("mha", "linear", d=16, heads=2, causal=causal,
                      pos=("equivariant_kernel", {"method": method[0], **method[1]}), **(extra or {}), **more)
    perturb_params(m, scale=0.3)
    return m


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("method,extra,b,n", CASES)
def test_matches_the_equation(method, extra, b, n, causal):
    m = build(method, causal, extra)
    x = torch.randn(b, n, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(m(x, Ctx()), reference(m, x, causal), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", [ROT, CLIP, (("rotation", {"scales": 8, "max_timescale": 100.0}))])
def test_shifting_every_position_leaves_the_outputs(method):
    """The paper's claim: the same tokens at positions s..s+n-1 (a decoding cache's offset, one piece) give the
    outputs they give at 0..n-1, in float64 to 1e-10."""
    m = build(method, True)
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    want = m(x, Ctx())
    for s in (1, 7, 1000):
        torch.testing.assert_close(m(x, Ctx(cache=DecodeState(), offset=s)), want, rtol=1e-10, atol=1e-10)


def test_shifting_moves_an_absolute_scheme():
    """The control for the test above: rope before phi (mha(linear)'s absolute positions through the feature map)
    changes with the offset, so the offset does reach the positions."""
    m, _, _ = make_op("mha", "linear", d=16, heads=2, causal=True, pos=("rope", {}))
    perturb_params(m, scale=0.3)
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    assert (m(x, Ctx(cache=DecodeState(), offset=7)) - m(x, Ctx())).abs().max() > 1e-3


def test_the_rotation_score_depends_on_the_offset_alone():
    """<u_(i+s) R, u_(j+s)> == <u_i R, u_j> (the score term, both sides), while u_i R itself moves with s (the
    control: an absolute encoding would pass nothing through the first check)."""
    m = build(ROT, False)
    p0, u0, _ = m.pos.position_features(0, 20, "cpu")
    for s in (7, 1000):
        ps, us, _ = m.pos.position_features(s, 20, "cpu")
        assert (ps - p0).abs().max() > 0.1
        torch.testing.assert_close(ps @ us.T, p0 @ u0.T, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method,extra", [(ROT, {"kv_heads": 1}), (CLIP, {}), (("clipped", {"clip": 5}), {"kv_heads": 1})])
def test_decodes_at_an_offset(method, extra):
    m = build(method, True, extra)
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    got, _ = decode_in_pieces(m, x, [7, 1, 9, 3])
    torch.testing.assert_close(got, m(x, Ctx()), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", [ROT, CLIP])
def test_decodes_with_constant_state(method):
    build_args = {"heads": 2, "pos": ("equivariant_kernel", {"method": method[0], **method[1]})}
    m = build(method, True)
    assert_decodes_with_constant_state(m, "mha", "linear", 16, build_args)


@pytest.mark.parametrize("method", [ROT, CLIP])
def test_padded_keys_add_nothing(method):
    m = build(method, False)
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    mask = torch.ones(1, 9, dtype=torch.bool)
    mask[0, 6:] = False
    torch.testing.assert_close(m(x, Ctx(mask=mask))[:, :6], reference(m, x, False, mask)[:, :6],
                               rtol=1e-10, atol=1e-10)


def test_refusals():
    with pytest.raises(EvoError, match="E302(.|\n)*pos\\(equivariant_kernel\\) works inside: mha\\(linear\\)"):
        evodsl.compile("model m = input(features, d=32) -> pos(equivariant_kernel) -> mha(performer)")
    with pytest.raises(EvoError, match="E302(.|\n)*pos\\(equivariant_kernel\\) works inside: mha\\(linear\\)"):
        evodsl.compile("model m = input(features, d=32) -> pos(equivariant_kernel, method=clipped) -> mha(softmax)")
    with pytest.raises(EvoError, match="E300(.|\n)*scales= is for method=rotation, not method=clipped"):
        evodsl.compile("model m = input(features, d=32) -> pos(equivariant_kernel, method=clipped, scales=2) -> mha(linear)")
    with pytest.raises(EvoError, match="E300(.|\n)*clip= is for method=clipped"):
        evodsl.compile("model m = input(features, d=32) -> pos(equivariant_kernel, clip=4) -> mha(linear)")
    with pytest.raises(EvoError, match="clip"):
        evodsl.compile("model m = input(features, d=32) -> pos(equivariant_kernel, method=clipped, clip=0) -> mha(linear)")
