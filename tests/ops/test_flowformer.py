"""mha(flowformer) against the paper's flow equations (the authors' normal and causal forms), computed here in
float64 with explicit sums over positions; decoding in pieces equals the forward; padding and GQA."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from evodsl.ops import OpEnv, ShapeProblem, load_all, lookup
from ophelpers import assert_no_leak, decode_in_pieces, head_projections, make_op, output_projection, perturb_params

D = 32


def _x(b: int, n: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(b, n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def reference(m, x, causal, eps=1e-6):
    """Per head and position, from the equations: the sums over all positions (bidirectional) or over j <= i,
    normalised by the count i + 1 (causal)."""
    q, k, v = head_projections(m, x)  # [b, n, H, dh]
    b, n, heads, dh = q.shape
    group = [hd * k.shape[2] // heads for hd in range(heads)]
    fq, fk, v = q.sigmoid(), k[:, :, group].sigmoid(), v[:, :, group]
    o = torch.zeros(b, n, heads, dh, dtype=x.dtype)
    dot = lambda a, c: torch.einsum("bhd,bhd->bh", a + eps, c + eps)  # noqa: E731 - (a + eps)^T (c + eps)
    if not causal:
        inc = torch.stack([1 / dot(fq[:, i], fk.sum(1)) for i in range(n)], 1)  # [b, n, H]
        outg = torch.stack([1 / dot(fk[:, j], fq.sum(1)) for j in range(n)], 1)
        ko = torch.einsum("bjh,bjhd->bhd", outg, fk)
        qi = torch.einsum("bih,bihd->bhd", inc, fq)
        sink = torch.stack([dot(fq[:, i], ko) for i in range(n)], 1)
        source = torch.stack([dot(fk[:, j], qi) for j in range(n)], 1).clamp(-1, 1)
        comp = torch.exp(source) / torch.exp(source).sum(1, keepdim=True) * n
        for i in range(n):
            w = torch.einsum("bhd,bjhd->bjh", fq[:, i] * inc[:, i, :, None], fk)
            o[:, i] = torch.sigmoid(sink[:, i])[..., None] * torch.einsum("bjh,bjhe->bhe", w, v * comp[..., None])
        return output_projection(m, o.reshape(b, n, heads * dh))
    inc = torch.stack([(i + 1) / dot(fq[:, i], fk[:, :i + 1].sum(1)) for i in range(n)], 1)
    outg = torch.stack([(j + 1) / dot(fk[:, j], fq[:, :j + 1].sum(1)) for j in range(n)], 1)
    sink = torch.stack([dot(fq[:, i], torch.einsum("bjh,bjhd->bhd", outg[:, :i + 1], fk[:, :i + 1])) / (i + 1)
                        for i in range(n)], 1)
    source = torch.stack([dot(fk[:, j], torch.einsum("bih,bihd->bhd", inc[:, :j + 1], fq[:, :j + 1])) / (j + 1)
                          for j in range(n)], 1).clamp(-1, 1)
    comp = torch.stack([torch.exp(source[:, j]) / torch.exp(source[:, :j + 1]).sum(1) * (j + 1) for j in range(n)], 1)
    for i in range(n):
        w = torch.einsum("bhd,bjhd->bjh", fq[:, i] * (inc[:, i] / (i + 1))[..., None], fk[:, :i + 1])
        o[:, i] = torch.sigmoid(sink[:, i])[..., None] * torch.einsum("bjh,bjhe->bhe", w, (v * comp[..., None])[:, :i + 1])
    return output_projection(m, o.reshape(b, n, heads * dh))


CASES = [(100, 64, 4, 4), (20, 64, 4, 4), (29, 8, 4, 2), (37, 4, 4, 1), (13, 4, 2, 2)]  # (n, chunk, heads, kv_heads)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("n,chunk,heads,kv_heads", CASES)
def test_flowformer_equation(causal, n, chunk, heads, kv_heads):
    m, _, _ = make_op("mha", "flowformer", d=D, causal=causal, heads=heads, kv_heads=kv_heads)
    m.chunk = chunk
    perturb_params(m)
    x = _x(2, n)
    ref = reference(m, x, causal)
    torch.testing.assert_close(m(x, None), ref, rtol=1e-10, atol=1e-10)
    if causal:  # the export's prefix-sum form
        q, k, v = m.qkv(x)
        count = torch.arange(1, n + 1, dtype=x.dtype)[:, None]
        fq, comp, alloc, _ = m._causal_flows(q.sigmoid(), m.expand_kv(k).sigmoid(), count)
        o = m._prefix_sums(fq, m.expand_kv(k).sigmoid(), m.expand_kv(v) * comp).mul_(alloc)
        torch.testing.assert_close(m.out(o), ref, rtol=1e-10, atol=1e-10)


def test_the_flows_matter():
    """Competition and allocation change the plain right product: not the normalised linear attention."""
    m, _, _ = make_op("mha", "flowformer", d=D, heads=4)
    perturb_params(m)
    x = _x(2, 16)
    q, k, v = m.qkv(x)
    fq, fk = q.sigmoid(), k.sigmoid()
    plain = (fq @ (fk.transpose(-1, -2) @ v)) / (fq @ fk.sum(2, keepdim=True).transpose(-1, -2))
    assert (m.out(plain) - m(x, None)).abs().max() > 1e-2


def test_decoding_in_pieces_equals_the_forward():
    m, _, _ = make_op("mha", "flowformer", d=D, causal=True, heads=4, kv_heads=2)
    m.chunk = 8
    perturb_params(m)
    x = _x(2, 31)
    full = m(x, None)
    got, _ = decode_in_pieces(m, x, (5, 1, 1, 7, 3, 1, 13))
    torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-12)


def test_causal_does_not_leak():
    m, _, _ = make_op("mha", "flowformer", d=D, causal=True, heads=4, kv_heads=2)
    m.chunk = 8
    perturb_params(m)
    assert_no_leak(lambda x: m(x, None), n=29, d=D)


def test_params_and_shape_rule():
    load_all()
    op = lookup("mha", "flowformer")
    assert op.causal == "yes" and op.supports == frozenset()
    with pytest.raises(ValidationError):
        op.params(eps=0.0)
    with pytest.raises(ShapeProblem) as e:
        op.shape(op.params(dropout=0.1), OpEnv(in_shapes=(("b", "n", D),)))
    assert e.value.field == "dropout"
