"""xattn(softmax, kv=NAME): cross-attention against its equation in float64 (queries from the stream, keys and
values from another of another length and width), padding of the named stream, the causal form aligned at the
end (Perceiver AR), and its declared cost held to measurement."""
from __future__ import annotations

import math

import pytest
import torch

from costhelpers import check_op_cost
from ophelpers import make_op, perturb_params
from evodsl.ops import Ctx

B, M, N, D, DKV = 2, 5, 9, 24, 16


def _reference(mod, x, kv, keep=None, scale=None):
    """softmax(Q K^T * scale + mask) V per head, from the weights, in float64; K/V heads shared by groups."""
    h, kvh, dh = mod.heads, mod.kv_heads, mod.head_dim
    lin = lambda t, layer: t @ layer.weight.T + (layer.bias if layer.bias is not None else 0)  # noqa: E731
    q = lin(x, mod.q_proj).reshape(x.shape[0], x.shape[1], h, dh)
    k = lin(kv, mod.k_proj).reshape(kv.shape[0], kv.shape[1], kvh, dh)
    v = lin(kv, mod.v_proj).reshape(kv.shape[0], kv.shape[1], kvh, dh)
    out = torch.zeros(x.shape[0], x.shape[1], h, dh, dtype=torch.float64)
    s = scale if scale is not None else 1 / math.sqrt(dh)
    for bi in range(x.shape[0]):
        for hi in range(h):
            g = hi // (h // kvh)
            scores = (q[bi, :, hi] @ k[bi, :, g].T) * s
            if keep is not None:
                scores = scores.masked_fill(~keep[bi], float("-inf"))
            out[bi, :, hi] = scores.softmax(-1) @ v[bi, :, g]
    return lin(out.reshape(x.shape[0], x.shape[1], h * dh), mod.o_proj)


def _build(causal=False, **kw):
    mod, _, _ = make_op("xattn", "softmax", d=D, in_shapes=(("b", "m", D), ("b", "n", DKV)),
                        in_causal=(causal, causal), kv="src", **kw)
    perturb_params(mod)
    return mod


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, M, D, generator=g, dtype=torch.float64),
            torch.randn(B, N, DKV, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("kw", [{"heads": 4}, {"heads": 4, "kv_heads": 2}, {"heads": 2, "kv_heads": 1, "head_dim": 5,
                                                                          "bias": False}, {"heads": 4, "scale": 1.0}])
def test_equation(kw):
    mod = _build(**kw)
    x, kv = _inputs()
    got = mod(x, Ctx(), kv)
    want = _reference(mod, x, kv, scale=kw.get("scale"))
    assert (got - want).abs().max().item() < 1e-10


def test_padded_source_keys_get_no_weight():
    mod = _build(heads=4)
    x, kv = _inputs()
    lengths = [N, 4]
    mask = torch.tensor([[j < L for j in range(N)] for L in lengths])
    ctx = Ctx()
    ctx.streams["src"] = (mask, True)
    got = mod(x, ctx, kv)
    for i, L in enumerate(lengths):  # each sequence alone, with its real keys only
        alone = mod(x[i:i + 1], Ctx(), kv[i:i + 1, :L])
        assert (got[i] - alone[0]).abs().max().item() < 1e-10
    assert (mod(x, Ctx(), kv)[1] - got[1]).abs().max().item() > 1e-3  # the mask did something


def test_causal_source_is_read_up_to_each_querys_position_aligned_at_the_end():
    """Queries are the last M positions of the causal stream: query i reads keys j <= i + N - M."""
    mod = _build(causal=True, heads=4, kv_heads=2)
    x, kv = _inputs()
    i, j = torch.arange(M)[:, None], torch.arange(N)[None, :]
    keep = (j <= i + N - M).expand(B, M, N)
    assert (mod(x, Ctx(), kv) - _reference(mod, x, kv, keep)).abs().max().item() < 1e-10
    # the leak test: changing source positions after t + N - M changes no query up to t, and does change t + 1
    base = mod(x, Ctx(), kv)
    for t in range(M - 1):
        kv2 = kv.clone()
        kv2[:, t + N - M + 1:] += 3 * torch.randn_like(kv2[:, t + N - M + 1:])
        y = mod(x, Ctx(), kv2)
        assert (y[:, : t + 1] - base[:, : t + 1]).abs().max().item() < 1e-10
        assert (y[:, t + 1] - base[:, t + 1]).abs().max().item() > 1e-6


def test_causal_with_left_padding_reads_tokens_only():
    mod = _build(causal=True, heads=4)
    x, kv = _inputs()
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, :3] = False  # left padding: not right-padded, so the mask is applied
    ctx = Ctx()
    ctx.streams["src"] = (mask, False)
    i, j = torch.arange(M)[:, None], torch.arange(N)[None, :]
    keep = (j <= i + N - M)[None] & mask[:, None, :]
    assert (mod(x, ctx, kv) - _reference(mod, x, kv, keep)).abs().max().item() < 1e-10


SIZES = [(2, 64, 64, 40), (1, 96, 96, 130)]  # (b, m, d, n of the source)


@pytest.mark.parametrize("b,m,d,n", SIZES)
@pytest.mark.parametrize("build", [{}, {"kv_heads": 2}, {"d_kv": 48}, {"causal": True}, {"dropout": 0.1},
                                   {"head_dim": 8, "bias": False}])
def test_declared_cost_matches_measurement(b, m, d, n, build):
    build = dict(build)
    d_kv, causal = build.pop("d_kv", d), build.pop("causal", False)
    n = n + m if causal else n  # a causal stream is read by at most as many queries as it has positions
    check_op_cost("xattn", "softmax", b=b, n=m, d=d, heads=4, kv="src", in_shapes=(("b", "n", d), ("b", n, d_kv)),
                  in_causal=(causal, causal), **build)



def test_a_causal_stream_is_read_by_at_most_as_many_queries():
    """In a causal stream the queries are the last positions of the stream read: more queries than keys is
    refused, statically where the lengths say so (E300) and at run time otherwise (E410)."""
    import evodsl

    bad = ("d_model = 32\nheads = 4\nmodel m(causal=true) {\n x = input(features, d=32)\n"
           " lat = latent(array, length=4) -> residual(xattn(softmax, kv=x))\n"
           " y = lat -> slice(last=2) -> residual(xattn(softmax, kv=lat)) -> cat(suffix=lat)\n"
           " out = y -> residual(xattn(softmax, kv=lat)) -> head(linear, d_out=2)\n}\n")
    with pytest.raises(evodsl.EvoError, match="E300.*6 queries"):
        evodsl.parse(bad)
    late = ("d_model = 32\nheads = 4\nmodel m(causal=true) {\n x = input(features, d=32)\n"
            " lat = latent(array, length=4) -> residual(xattn(softmax, kv=x))\n"
            " out = x -> residual(xattn(softmax, kv=lat)) -> head(linear, d_out=2)\n}\n")
    model = evodsl.compile(late)  # n queries against 4 keys: known at run time
    assert model(torch.randn(1, 4, 32)).shape == (1, 4, 2)
    with pytest.raises(evodsl.EvoError, match="E410"):
        model(torch.randn(1, 5, 32))
