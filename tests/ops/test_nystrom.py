"""mha(nystrom) against its defining equation, in float64: per head kernel_1 Z (kernel_3 V) (+ the depthwise
convolution of V), the landmarks as means of segments listed here position by position, the kernels as explicit
softmaxes, Z by the paper's iteration written out as a polynomial in A Z over 2-D matrices; at most `landmarks`
positions, exact softmax attention. The iteration approaches torch.linalg.pinv; with one token per landmark the
method approaches exact softmax attention as the iterations grow. Padding: test_padding.py."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx, OpEnv, ShapeProblem, lookup
from evodsl.ops.attention.nystrom import iterative_pinv
from ophelpers import head_projections, make_op, output_projection, perturb_params

D = 32


def softmax_rows(s):
    w = torch.exp(s - s.amax(-1, keepdim=True))
    return w / w.sum(-1, keepdim=True)


def reference_pinv(a, iters, c):
    """Z_0 = A^T / c, Z <- Z (13/4 I - 15/4 AZ + 7/4 (AZ)^2 - 1/4 (AZ)^3), one 2-D matrix."""
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    z = a.T / c
    for _ in range(iters):
        p = a @ z
        z = z @ (3.25 * eye - 3.75 * p + 1.75 * p @ p - 0.25 * p @ p @ p)
    return z


def segments(n, m):
    """Position lists of the m segments: position r is in segment floor(r m / n)."""
    return [[r for r in range(n) if r * m // n == j] for j in range(m)]


def reference_nystrom(mod, x, m, iters, per_head):
    b, n, _ = x.shape
    h, g, dh = mod.heads, mod.kv_heads, mod.head_dim
    q, k, v = head_projections(mod, x)  # [b, n, heads, dh]
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        kernels = []
        for hh in range(h):
            Q, K, V = q[bb, :, hh], k[bb, :, hh // (h // g)], v[bb, :, hh // (h // g)]
            if n <= m:
                out[bb, :, hh] = softmax_rows(Q @ K.T / math.sqrt(dh)) @ V
                continue
            segs = segments(n, m)
            Ql = torch.stack([Q[s].mean(0) for s in segs])
            Kl = torch.stack([K[s].mean(0) for s in segs])
            k1 = softmax_rows(torch.einsum("id,jd->ij", Q, Kl) / math.sqrt(dh))
            k2 = softmax_rows(torch.einsum("id,jd->ij", Ql, Kl) / math.sqrt(dh))
            k3 = softmax_rows(torch.einsum("id,jd->ij", Ql, K) / math.sqrt(dh))
            kernels.append((k1, k2, k3, V))
        if n > m:
            cols = [max(k2.sum(0)) for _, k2, _, _ in kernels]  # ||kernel_2||_1 per head
            for hh, (k1, k2, k3, V) in enumerate(kernels):
                z = reference_pinv(k2, iters, cols[hh] if per_head else max(cols))
                out[bb, :, hh] = k1 @ z @ (k3 @ V)
    if mod.conv is not None:
        w = mod.conv[:, 0, :, 0]  # [kv, taps]
        half = w.shape[1] // 2
        for hh in range(h):
            for t in range(n):
                for s in range(w.shape[1]):
                    if 0 <= t + s - half < n:
                        out[:, t, hh] += w[hh // (h // g), s] * v[:, t + s - half, hh // (h // g)]
    return output_projection(mod, out.reshape(b, n, h * dh))


@pytest.mark.parametrize("n,m,kv_heads,conv,init", [
    (40, 8, None, 0, "head"),  # equal segments
    (37, 8, 2, 5, "sequence"),  # uneven segments, grouped K/V heads, the convolution
    (64, 16, 1, 3, "head"),
    (23, 5, None, 0, "sequence"),
    (10, 16, None, 7, "head"),  # n < m: exact softmax attention
    (12, 12, 2, 3, "head"),  # n = m: exact
])
def test_nystrom_matches_equation(n, m, kv_heads, conv, init):
    mod, _, _ = make_op("mha", "nystrom", d=D, heads=4, kv_heads=kv_heads, landmarks=m, conv=conv, pinv_init=init)
    perturb_params(mod, scale=0.3)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = mod(x, Ctx()), reference_nystrom(mod, x, m, 6, init == "head")
    assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


def test_iterative_pinv_is_the_paper_iteration_and_approaches_pinv():
    g = torch.Generator().manual_seed(0)
    a = softmax_rows(torch.randn(2, 3, 10, 10, generator=g, dtype=torch.float64) * 2)
    for iters in (1, 6):
        for per_head in (True, False):
            z = iterative_pinv(a, iters, per_head)
            c = a.sum(-2).amax(-1)
            for bb in range(2):
                for hh in range(3):
                    ref = reference_pinv(a[bb, hh], iters, c[bb, hh] if per_head else c[bb].max())
                    assert (z[bb, hh] - ref).abs().max().item() < 1e-10 * ref.abs().max().item()
    exact = torch.linalg.pinv(a)
    errors = [(iterative_pinv(a, i) - exact).abs().max().item() / exact.abs().max().item() for i in (6, 9, 12, 30)]
    assert errors[0] > errors[1] > errors[2] > errors[3], errors  # at 30, the rounding of the converged one
    assert errors[3] < 1e-12, errors


def test_one_token_per_landmark_approaches_softmax_attention():
    """landmarks = n (each segment one token): kernel_1 = kernel_2 = kernel_3 = A, so the output is A A^+ A V = A V
    up to the iteration's error: relative error below 5e-2 with the paper's 6 iterations, below 1e-10 with 30
    (the first layer's A here has a condition number of about 1e3)."""
    x = torch.randn(2, 16, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errs = []
    for iters in (6, 30):
        mod, _, _ = make_op("mha", "nystrom", d=D, heads=4, landmarks=16, pinv_iters=iters)
        perturb_params(mod, scale=0.2)
        with torch.no_grad():
            q, k, v = mod.qkv(x)
            approx = mod._nystrom(q, k, v, q, k)  # the Nyström product with Q~ = Q, K~ = K
            exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        errs.append(((approx - exact).abs().max() / exact.abs().max()).item())
    assert 1e-4 < errs[0] < 5e-2 and errs[1] < 1e-10, errs


def test_refusals():
    op = lookup("mha", "nystrom")
    env = OpEnv(in_shapes=(("b", "n", D),))
    with pytest.raises(ShapeProblem, match="no dropout"):
        op.shape(op.params(dropout=0.1), env)
    with pytest.raises(ShapeProblem, match="conv=4 is even"):
        op.shape(op.params(conv=4), env)
    src = "d_model = 32\nmodel m(causal=true) = input(tokens, vocab=11) -> embed(token) -> mha(nystrom, landmarks=4) -> head(lm)\n"
    with pytest.raises(EvoError, match="E301"):
        evodsl.parse(src)
