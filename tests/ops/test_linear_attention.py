"""mha(linear) against its defining equation, computed here in float64 with an explicit loop over positions i;
the causal leak check (its O(n) growth: test_growth.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from evodsl.ops import OpEnv, ShapeProblem, load_all, lookup
from ophelpers import assert_no_leak, make_op, perturb_params

D = 32


def _x(b: int, n: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, D, generator=g, dtype=torch.float64)


def _rotate(t: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """RoFormer's rotation of t [b, h, n, dh]: pair (2i, 2i+1) at position p turns by p * base^(-2i/dh)."""
    n, dh = t.shape[-2:]
    out = t.clone()
    for i in range(dh // 2):
        ang = torch.arange(n, dtype=torch.float64) * base ** (-2 * i / dh)
        c, s = torch.cos(ang), torch.sin(ang)
        out[..., 2 * i] = t[..., 2 * i] * c - t[..., 2 * i + 1] * s
        out[..., 2 * i + 1] = t[..., 2 * i] * s + t[..., 2 * i + 1] * c
    return out


def reference(m, x: torch.Tensor, heads: int, kv_heads: int, causal: bool, eps: float, rope: bool = False):
    """V'_i = phi(q_i)^T sum_j phi(k_j) v_j^T / (phi(q_i)^T sum_j phi(k_j) + eps), j over all or j <= i."""
    b, n, _ = x.shape
    dh = m.q_proj.weight.shape[0] // heads

    def proj(lin, h):
        return (x @ lin.weight.T + lin.bias).view(b, n, h, dh).transpose(1, 2)

    q, k, v = proj(m.q_proj, heads), proj(m.k_proj, kv_heads), proj(m.v_proj, kv_heads)
    if rope:
        q, k = _rotate(q), _rotate(k)
    group = [h * kv_heads // heads for h in range(heads)]  # query head h reads K/V head h // (heads / kv_heads)
    k, v = k[:, group], v[:, group]
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    out = torch.empty_like(q)
    for i in range(n):
        last = i + 1 if causal else n
        w = torch.einsum("bhd,bhjd->bhj", fq[:, :, i], fk[:, :, :last])
        out[:, :, i] = torch.einsum("bhj,bhjd->bhd", w, v[:, :, :last]) / (w.sum(-1, keepdim=True) + eps)
    return out.transpose(1, 2).reshape(b, n, heads * dh) @ m.o_proj.weight.T + m.o_proj.bias


CASES = [  # (n, chunk, heads, kv_heads, eps)
    (100, 64, 4, 4, 1e-6),  # two chunks, n not a multiple of the chunk
    (20, 64, 4, 4, 1e-6),  # n < chunk
    (128, 64, 4, 4, 1e-6),  # n a multiple of the chunk
    (29, 8, 4, 4, 1e-6),  # many chunks and a remainder
    (29, 8, 4, 2, 1e-6),  # grouped K/V heads
    (37, 8, 4, 1, 1e-6),  # multi-query
    (13, 4, 2, 2, 0.75),  # a large eps, so where it is added shows
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("n,chunk,heads,kv_heads,eps", CASES)
def test_linear_attention_equation(causal, n, chunk, heads, kv_heads, eps):
    m, _, _ = make_op("mha", "linear", d=D, causal=causal, heads=heads, kv_heads=kv_heads, eps=eps)
    m.chunk = chunk
    perturb_params(m)
    x = _x(2, n)
    ref = reference(m, x, heads, kv_heads, causal, eps)
    torch.testing.assert_close(m(x, None), ref, rtol=1e-9, atol=1e-10)  # recording: the chunked form
    with torch.no_grad():  # causal: the chunk-by-chunk inference form
        torch.testing.assert_close(m(x, None), ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_linear_attention_rope(causal):
    load_all()
    m, _, _ = make_op("mha", "linear", d=D, causal=causal, heads=4, kv_heads=2, pos=("rope", {}))
    m.chunk = 8
    perturb_params(m)
    x = _x(2, 29)
    want = reference(m, x, 4, 2, causal, 1e-6, rope=True)
    torch.testing.assert_close(m(x, None), want, rtol=1e-9, atol=1e-10)
    assert not torch.allclose(want, reference(m, x, 4, 2, causal, 1e-6, rope=False))  # the rotation matters


@pytest.mark.parametrize("chunk", [8, 64])
def test_linear_attention_causal_does_not_leak(chunk):
    m, _, _ = make_op("mha", "linear", d=D, causal=True, heads=4, kv_heads=2)
    m.chunk = chunk
    perturb_params(m)
    assert_no_leak(lambda x: m(x, None), n=29, d=D)


def test_leak_check_catches_the_bidirectional_form():
    m, _, _ = make_op("mha", "linear", d=D, causal=False, heads=4)
    perturb_params(m)
    with pytest.raises(AssertionError, match="changed by"):
        assert_no_leak(lambda x: m(x, None), n=8, d=D)


def test_padding_keeps_gradients_finite_with_eps_zero():
    m, _, _ = make_op("mha", "linear", d=D, causal=True, heads=4, eps=0.0)
    perturb_params(m)
    x = _x(1, 20).requires_grad_()  # 20 real tokens, 44 padded ones in the single chunk
    m(x, None).square().sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_params_and_shape_rule():
    load_all()
    op = lookup("mha", "linear")
    assert op.causal == "yes" and op.supports == frozenset({"rope", "permute", "kernel_rpe", "equivariant_kernel"})
    with pytest.raises(ValidationError):
        op.params(phi="relu")
    with pytest.raises(ValidationError):
        op.params(eps=-1.0)
    with pytest.raises(ShapeProblem) as e:
        op.shape(op.params(dropout=0.1), OpEnv(in_shapes=(("b", "n", D),)))
    assert e.value.field == "dropout"
