"""pos(kernel_rpe): kernelized attention with relative positional encoding (arXiv:2106.12566) inside mha(linear), against a float64 reference from the equation: the weight of key j for query i is
e^(b_(j-i)) phi(q_i)·phi(k_j) (causal: j <= i), the output sum_j w_ij v_j / sum_j w_ij, computed over the [n, n]
weights directly (not the module's FFT). Shapes: GQA, n odd and even, n past max_len (clipped); decoding at an offset; padding; refusals."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import decode_in_pieces, head_projections, make_op, output_projection, perturb_params


def reference(m, x, causal, mask=None):
    b, n, _ = x.shape
    q, k, v = head_projections(m, x)
    g = m.heads // m.kv_heads
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    if hasattr(m, "w"):  # FAVOR+: exp(w x' - |x'|^2 / 2), its constant 1/sqrt(m) cancels
        sc = q.shape[-1] ** -0.25
        phi = lambda t: torch.exp((t * sc) @ m.w.T - (t * sc).square().sum(-1, keepdim=True) / 2)  # noqa: E731
    else:
        phi = lambda t: F.elu(t) + 1  # noqa: E731
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    top = m.pos.max_len - 1
    c = m.pos.b[:, (j - i).clamp(-top, top) + top].exp()  # e^(b_(j-i)) [h, n, n], distances clipped to max_len - 1
    w = torch.einsum("bihf,bjhf->bhij", phi(q), phi(k)) * c
    if causal:
        w = w.masked_fill(j > i, 0.0)
    if mask is not None:
        w = w * mask[:, None, None, :]
    den = w.sum(-1)[..., None] + (0 if hasattr(m, "w") else m.eps)
    o = torch.einsum("bhij,bjhc->bihc", w / den, v)
    return output_projection(m, o.reshape(b, n, -1))


CASES = [("linear", {}, 2, 9), ("linear", {"kv_heads": 2}, 1, 12), ("linear", {"kv_heads": 1, "bias": False}, 1, 8)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant,extra,b,n", CASES)
def test_matches_the_equation(variant, extra, b, n, causal):
    m, _, _ = make_op("mha", variant, d=16, heads=2, causal=causal, pos=("kernel_rpe", {"max_len": 16}), **extra)
    perturb_params(m, scale=0.3)
    x = torch.randn(b, n, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(m(x, Ctx()), reference(m, x, causal), rtol=1e-9, atol=1e-10)


def test_starts_as_plain_linear_attention():
    m, _, _ = make_op("mha", "linear", d=16, heads=2, causal=True, pos=("kernel_rpe", {"max_len": 16}))
    plain, _, _ = make_op("mha", "linear", d=16, heads=2, causal=True)
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("pos.")})
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x, Ctx()), plain(x, Ctx()), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("variant,extra", [("linear", {"kv_heads": 2}), ("linear", {})])
def test_decodes_at_an_offset(variant, extra):
    m, _, _ = make_op("mha", variant, d=16, heads=2, causal=True, pos=("kernel_rpe", {"max_len": 32}), **extra)
    perturb_params(m, scale=0.3)
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    got, _ = decode_in_pieces(m, x, [7, 1, 9, 3])
    torch.testing.assert_close(got, m(x, Ctx()), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("variant", ["linear"])
def test_padded_keys_add_nothing(variant):
    m, _, _ = make_op("mha", variant, d=16, heads=2, pos=("kernel_rpe", {"max_len": 16}))
    perturb_params(m, scale=0.3)
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    mask = torch.ones(1, 9, dtype=torch.bool)
    mask[0, 6:] = False
    torch.testing.assert_close(m(x, Ctx(mask=mask))[:, :6], reference(m, x, False, mask)[:, :6],
                               rtol=1e-9, atol=1e-10)


def test_refusals():
    with pytest.raises(EvoError, match="E302(.|\n)*pos\\(kernel_rpe\\) works inside: mha\\(linear\\)"):
        evodsl.compile("model m = input(features, d=32) -> pos(kernel_rpe) -> mha(performer)")


@pytest.mark.parametrize("causal", [False, True])
def test_distances_past_max_len_are_clipped(causal):
    m, _, _ = make_op("mha", "linear", d=16, heads=2, causal=causal, pos=("kernel_rpe", {"max_len": 4}))
    perturb_params(m, scale=0.3)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x, Ctx()), reference(m, x, causal), rtol=1e-9, atol=1e-10)
