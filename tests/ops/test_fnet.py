"""mixer(fnet) against its defining equation: explicit DFT matrices exp(-2 pi i j k / N), built here in float64
and applied by matmul over the sequence and the hidden dimension, real part kept."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl.ops import OpEnv, ShapeProblem, load_all, lookup
from ophelpers import make_op


def dft_matrix(size: int) -> torch.Tensor:
    j = torch.arange(size, dtype=torch.float64)
    angle = -2 * math.pi * torch.outer(j, j) / size
    return torch.complex(torch.cos(angle), torch.sin(angle))


def reference(x: torch.Tensor) -> torch.Tensor:
    """y[t, c] = Re sum_s sum_e F_n[t, s] x[s, e] F_d[e, c]."""
    n, d = x.shape[-2:]
    return (dft_matrix(n) @ x.to(torch.complex128) @ dft_matrix(d)).real


def _x(shape, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(2, 7, 12), (1, 1, 5), (3, 16, 8), (2, 33, 10)])
def test_fnet_equation(shape):
    m, _, _ = make_op("mixer", "fnet", d=shape[-1])
    x = _x(shape)
    y = m(x, None)
    assert y.dtype == torch.float64 and y.shape == x.shape
    torch.testing.assert_close(y, reference(x), rtol=1e-10, atol=1e-10)


def test_fnet_mixes_both_dimensions():
    m, _, _ = make_op("mixer", "fnet", d=6)
    x = torch.zeros(1, 5, 6, dtype=torch.float64)
    x[0, 2, 3] = 1.0  # one spike reaches every token and every channel
    y = m(x, None)
    assert (y.abs() > 1e-3).sum() > 5 * 6 // 2 and (y != 0).any(dim=1).all() and (y != 0).any(dim=2).all()
    torch.testing.assert_close(y, reference(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-1)])
def test_fnet_keeps_the_input_dtype(dtype, tol):
    m, _, _ = make_op("mixer", "fnet", d=12, dtype=dtype)
    x = _x((2, 9, 12))
    y = m(x.to(dtype), None)
    assert y.dtype == dtype
    want = reference(x.to(dtype).double())
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_fnet_declaration():
    load_all()
    op = lookup("mixer", "fnet")
    assert op.causal == "no" and not op.params.model_fields
    m, _, _ = make_op("mixer", "fnet", d=8)
    assert not list(m.parameters())
    with pytest.raises(ShapeProblem):
        op.shape(op.params(), OpEnv(in_shapes=(("b", 8),)))
    assert op.shape(op.params(), OpEnv(in_shapes=(("b", "n", 8),))) == ("b", "n", 8)
