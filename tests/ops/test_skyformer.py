"""mha(skyformer) against its defining equations, in float64: the Gaussian kernel from explicit differences
||q_i - k_j||^2, the landmarks listed position by position (the first of each of m segments), M + gamma I, its
symmetric normalisation by its row sums and the Nyströmformer iteration written out as a polynomial over 2-D
matrices; at most `landmarks` positions, exact kernelized attention C V. With every row of [Q; K] a landmark the
Nyström form is C V exactly (gamma = 0, enough iterations); the error against C V shrinks as landmarks grow.
Padding: test_padding.py."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx, OpEnv, ShapeProblem, lookup
from evodsl.ops.attention._gaussian import gaussian_kernel
from ophelpers import head_projections, make_op, output_projection, perturb_params

D = 32


def kappa(x, y):
    """exp(-||x_i - y_j||^2 / (2 sqrt(dh))) from the differences themselves."""
    diff = x[:, None, :] - y[None, :, :]
    return torch.exp(-(diff ** 2).sum(-1) / (2 * math.sqrt(x.shape[-1])))


def reference_pinv(a, iters):
    """Nyströmformer's iteration: Z_0 = A^T / ||A||_1, Z <- Z (13/4 I - 15/4 AZ + 7/4 (AZ)^2 - 1/4 (AZ)^3)."""
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    z = a.T / a.sum(0).max()
    for _ in range(iters):
        p = a @ z
        z = z @ (3.25 * eye - 3.75 * p + 1.75 * p @ p - 0.25 * p @ p @ p)
    return z


def first_of_segments(n, m):
    """The first position r of each segment j = floor(r m / n)."""
    return [min(r for r in range(n) if r * m // n == j) for j in range(m)]


def reference_skyformer(mod, x, m, iters, ridge):
    b, n, _ = x.shape
    h, g, dh = mod.heads, mod.kv_heads, mod.head_dim
    q, k, v = head_projections(mod, x)  # [b, n, heads, dh]
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        for hh in range(h):
            Q, K, V = q[bb, :, hh], k[bb, :, hh // (h // g)], v[bb, :, hh // (h // g)]
            if n <= m:
                out[bb, :, hh] = kappa(Q, K) @ V
                continue
            pos = first_of_segments(n, m)
            L = torch.cat((Q[pos], K[pos]))  # S^T [Q; K]
            M = kappa(L, L) + ridge * torch.eye(2 * m, dtype=x.dtype)
            d = torch.diag(M.sum(1) ** -0.5)
            pinv = d @ reference_pinv(d @ M @ d, iters) @ d
            out[bb, :, hh] = kappa(Q, L) @ pinv @ kappa(L, K) @ V
    return output_projection(mod, out.reshape(b, n, h * dh))


@pytest.mark.parametrize("n,m,kv_heads,iters,ridge", [
    (40, 8, None, 6, 0.1),
    (37, 8, 2, 6, 0.1),  # segments of uneven sizes, grouped K/V heads
    (64, 16, 1, 3, 0.5),
    (23, 5, None, 10, 0.0),
    (10, 16, 2, 6, 0.1),  # n < m: exact kernelized attention
    (12, 12, None, 6, 0.1),  # n = m: exact
])
def test_skyformer_matches_equation(n, m, kv_heads, iters, ridge):
    mod, _, _ = make_op("mha", "skyformer", d=D, heads=4, kv_heads=kv_heads, landmarks=m, pinv_iters=iters,
                        ridge=ridge)
    perturb_params(mod, scale=0.3)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = mod(x, Ctx()), reference_skyformer(mod, x, m, iters, ridge)
    assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


def test_the_padded_form_is_the_same_equation():
    """The masked path (positions by token counts, a select for short sequences) on an unpadded batch."""
    mod, _, _ = make_op("mha", "skyformer", d=D, heads=4, kv_heads=2, landmarks=7)
    perturb_params(mod, scale=0.3)
    x = torch.randn(2, 30, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        y = mod(x, Ctx(mask=torch.ones(2, 30, dtype=torch.bool)))
    ref = reference_skyformer(mod, x, 7, 6, 0.1)
    assert (y - ref).abs().max().item() < 1e-10 * ref.abs().max().item()


def _nystrom_error(m, n=64, ridge=0.0, iters=30, all_rows=False):
    """Relative error of the module's landmark form against exact kernelized attention C V (one sequence)."""
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mod, _, _ = make_op("mha", "skyformer", d=D, heads=4, landmarks=m, ridge=ridge, pinv_iters=iters)
    perturb_params(mod, scale=0.2)
    with torch.no_grad():
        q, k, v = mod.qkv(x)
        exact = gaussian_kernel(q, k) @ v
        if all_rows:  # every row of [Q; K] a landmark
            land = torch.cat((q, k), 2)
            approx = gaussian_kernel(q, land) @ mod._inverse_times(land, gaussian_kernel(land, k) @ v)
        else:
            o = mod(x, Ctx())
            approx = (o - mod.o_proj.bias) @ torch.linalg.pinv(mod.o_proj.weight.T)
            approx = approx.unflatten(-1, (4, -1)).transpose(1, 2)
    return ((approx - exact).norm() / exact.norm()).item()


def test_every_row_a_landmark_is_exact_kernelized_attention():
    """S = I: kappa(Q, [Q; K]) B^+ kappa([Q; K], K) = C exactly when B^+ is (gamma = 0, 30 iterations);
    the paper's gamma = 0.1 with 6 iterations stays within 5%."""
    assert _nystrom_error(64, all_rows=True) < 1e-10
    assert _nystrom_error(64, ridge=0.1, iters=6, all_rows=True) < 5e-2


def test_error_shrinks_as_landmarks_grow():
    """Nested landmark sets (m = 4, 8, 16, 32 of n = 64): the relative error against C V falls each time, by
    at least a quarter, to below 0.15 at m = n / 2."""
    errs = [_nystrom_error(m) for m in (4, 8, 16, 32)]
    assert all(b < 0.75 * a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.15, errs


def test_kernel_is_the_gaussian_of_the_scaled_rows():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 3, 9, 16, generator=g, dtype=torch.float64), torch.randn(2, 3, 5, 16, generator=g,
                                                                                  dtype=torch.float64)
    want = torch.stack([torch.stack([kappa(x[i, j], y[i, j]) for j in range(3)]) for i in range(2)])
    assert (gaussian_kernel(x, y) - want).abs().max().item() < 1e-12
    assert (gaussian_kernel(x, x).diagonal(dim1=-2, dim2=-1) - 1).abs().max().item() < 1e-12


def test_refusals():
    op = lookup("mha", "skyformer")
    env = OpEnv(in_shapes=(("b", "n", D),))
    with pytest.raises(ShapeProblem, match="no dropout"):
        op.shape(op.params(dropout=0.1), env)
    src = ("d_model = 32\nmodel m(causal=true) = input(tokens, vocab=11) -> embed(token) -> mha(skyformer, "
           "landmarks=4) -> head(lm)\n")
    with pytest.raises(EvoError, match="E301"):
        evodsl.parse(src)
