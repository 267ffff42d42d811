"""mha(soft) against its defining equations, in float64: keys are the queries, the Gaussian kernel from explicit
differences ||q_i - q_j||^2, the bottleneck tokens as means of segments listed position by position, the
Newton-Raphson iteration V <- 2V - V P V over 2-D matrices; at most `landmarks` positions, exact S V. With one
token per landmark the Nyström form is S V exactly (ridge 0, enough iterations); the error against S V shrinks as
landmarks grow; the iteration approaches the inverse, and its backward is that of the inverse. Padding:
test_padding.py."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx, OpEnv, ShapeProblem, lookup
from evodsl.ops.attention._gaussian import gaussian_kernel
from evodsl.ops.attention.soft import NewtonPinv, newton_pinv
from ophelpers import make_op, output_projection, perturb_params

D = 32


def kappa(x, y):
    diff = x[:, None, :] - y[None, :, :]
    return torch.exp(-(diff ** 2).sum(-1) / (2 * math.sqrt(x.shape[-1])))


def reference_newton(a, iters, ridge):
    p = a + ridge * torch.eye(a.shape[0], dtype=a.dtype)
    z = 0.9 * 2 / a.sum(1).max() ** 2 * p
    for _ in range(iters):
        z = 2 * z - z @ p @ z
    return z


def segments(n, m):
    return [[r for r in range(n) if r * m // n == j] for j in range(m)]


def projections(mod, x):
    """q [b, n, heads, dh] and v [b, n, kv_heads, dh] from the weights (there is no key projection: K = Q)."""
    b, n, _ = x.shape
    q = (x @ mod.q_proj.weight.T + (0 if mod.q_proj.bias is None else mod.q_proj.bias)).view(b, n, mod.heads, -1)
    v = (x @ mod.v_proj.weight.T + (0 if mod.v_proj.bias is None else mod.v_proj.bias)).view(b, n, mod.kv_heads, -1)
    return q, v


def reference_soft(mod, x, m, iters, ridge):
    b, n, _ = x.shape
    h, g, dh = mod.heads, mod.kv_heads, mod.head_dim
    q, v = projections(mod, x)
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        for hh in range(h):
            Q, V = q[bb, :, hh], v[bb, :, hh // (h // g)]
            if n <= m:
                out[bb, :, hh] = kappa(Q, Q) @ V
                continue
            Ql = torch.stack([Q[s].mean(0) for s in segments(n, m)])
            K1 = kappa(Q, Ql)
            out[bb, :, hh] = K1 @ reference_newton(kappa(Ql, Ql), iters, ridge) @ K1.T @ V
    return output_projection(mod, out.reshape(b, n, h * dh))


@pytest.mark.parametrize("n,m,kv_heads,iters,ridge", [
    (40, 8, None, 20, 0.01),  # equal segments
    (37, 8, 2, 20, 0.01),  # uneven segments, V heads shared
    (64, 16, 1, 5, 0.5),
    (23, 5, None, 30, 0.0),
    (10, 16, 2, 20, 0.01),  # n < m: exact S V
    (12, 12, None, 20, 0.01),  # n = m: exact
])
def test_soft_matches_equation(n, m, kv_heads, iters, ridge):
    mod, _, _ = make_op("mha", "soft", d=D, heads=4, kv_heads=kv_heads, landmarks=m, pinv_iters=iters, ridge=ridge)
    perturb_params(mod, scale=0.3)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = mod(x, Ctx()), reference_soft(mod, x, m, iters, ridge)
    assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
    y2 = mod(x, Ctx())  # under autograd: the custom backward's forward is the same iteration
    assert (y2 - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


def test_the_padded_form_is_the_same_equation():
    mod, _, _ = make_op("mha", "soft", d=D, heads=4, kv_heads=2, landmarks=7)
    perturb_params(mod, scale=0.3)
    x = torch.randn(2, 30, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        y = mod(x, Ctx(mask=torch.ones(2, 30, dtype=torch.bool)))
    ref = reference_soft(mod, x, 7, 20, 0.01)
    assert (y - ref).abs().max().item() < 1e-10 * ref.abs().max().item()


def _error(m, n=64, ridge=0.0, iters=100, every_token=False, smooth=False):
    """Relative error of the landmark form against exact S V, per head (no projections around it). smooth: the
    tokens a random walk (neighbours alike, as in an image), else independent."""
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x.cumsum(1) / 4 if smooth else x
    mod, _, _ = make_op("mha", "soft", d=D, heads=4, landmarks=m, ridge=ridge, pinv_iters=iters)
    perturb_params(mod, scale=0.2)
    q, v = projections(mod, x)
    q, v = q.transpose(1, 2), v.transpose(1, 2)
    exact = gaussian_kernel(q, q) @ v
    if every_token:
        ql = q
    else:  # the module's landmarks: the means of m equal segments
        ql = q.unflatten(2, (m, n // m)).mean(3)
    k1 = gaussian_kernel(q, ql)
    approx = k1 @ newton_pinv(gaussian_kernel(ql, ql), iters, ridge) @ k1.transpose(-1, -2) @ v
    return ((approx - exact).norm() / exact.norm()).item()


def test_one_token_per_landmark_is_exact():
    """Q~ = Q: K1 = A = S and S A^+ S = S exactly when A^+ is (ridge 0, 100 iterations); the code's ridge 0.01
    and 20 iterations within 5%."""
    assert _error(64, every_token=True) < 1e-9
    assert _error(64, ridge=0.01, iters=20, every_token=True) < 5e-2


def test_error_shrinks_as_landmarks_grow():
    """m = 4, 8, 16, 32 of n = 64. Segment means suit tokens whose neighbours are alike: there the error falls
    by half or more with each doubling, below 1e-2 at m = 32; with independent tokens (the means shrink towards
    the centre) it still falls each time, slowly (0.68 to 0.37 here)."""
    errs = [_error(m, smooth=True) for m in (4, 8, 16, 32)]
    assert all(b < 0.5 * a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-2, errs
    errs = [_error(m) for m in (4, 8, 16, 32)]
    assert all(b < 0.9 * a for a, b in zip(errs, errs[1:])), errs


def test_newton_iteration_approaches_the_inverse_and_its_backward_is_the_inverse_s():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, 8, generator=g, dtype=torch.float64)
    a = gaussian_kernel(x, x)
    exact = torch.linalg.inv(a + 0.01 * torch.eye(10, dtype=a.dtype))
    for bb in range(2):
        for hh in range(3):
            ref = reference_newton(a[bb, hh], 7, 0.01)
            assert (newton_pinv(a, 7, 0.01)[bb, hh] - ref).abs().max() < 1e-12 * ref.abs().max()
    errs = [((newton_pinv(a, it, 0.01) - exact).abs().max() / exact.abs().max()).item() for it in (5, 10, 20, 40)]
    assert errs[0] > errs[1] > errs[2] and errs[3] < 1e-10, errs
    a = a.clone().requires_grad_()
    weight = torch.randn(2, 3, 10, 10, generator=g, dtype=torch.float64)
    (NewtonPinv.apply(a, 60, 0.01) * weight).sum().backward()
    b = a.detach().clone().requires_grad_()
    (torch.linalg.inv(b + 0.01 * torch.eye(10, dtype=b.dtype)) * weight).sum().backward()
    assert (a.grad - b.grad).abs().max() < 1e-8 * b.grad.abs().max()


def test_no_key_projection():
    mod, _, _ = make_op("mha", "soft", d=D, heads=4, landmarks=8)
    assert not hasattr(mod, "k_proj")
    assert sum(p.numel() for p in mod.parameters()) == 3 * (D * D + D)


def test_refusals():
    op = lookup("mha", "soft")
    env = OpEnv(in_shapes=(("b", "n", D),))
    with pytest.raises(ShapeProblem, match="no dropout"):
        op.shape(op.params(dropout=0.1), env)
    src = ("d_model = 32\nmodel m(causal=true) = input(tokens, vocab=11) -> embed(token) -> mha(soft, "
           "landmarks=4) -> head(lm)\n")
    with pytest.raises(EvoError, match="E301"):
        evodsl.parse(src)
