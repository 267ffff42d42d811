"""mha(softmax, qk_norm=true) against QKNorm's equation (Henry et al. 2020) in float64, written per head with loops:
q^ = q / ||q||, k^ = k / ||k||, softmax(g q^ . k^) V, g(0) = log2(L^2 - L); with grouped K/V heads, causal, n of
one token, padding; that it stays on SDPA; its causal form leaks nothing; the errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import evodsl
from evodsl.diagnostics import EvoError
from evodsl.ops import Ctx
from ophelpers import exported_parity, make_op, perturb_params

TOP = "d_model = 16\nheads = 2\n"


def ref_qk_norm(x, m, causal: bool, keep=None):
    """The paper's attention, every (head, query, key) in a loop; the projections' weights read from m."""
    b, n, _ = x.shape
    h, kv, dh = m.heads, m.kv_heads, m.head_dim
    q = (x @ m.q_proj.weight.T + m.q_proj.bias).reshape(b, n, h, dh)
    k = (x @ m.k_proj.weight.T + m.k_proj.bias).reshape(b, n, kv, dh)
    v = (x @ m.v_proj.weight.T + m.v_proj.bias).reshape(b, n, kv, dh)
    g = float(m.qk_gain.detach())
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bi in range(b):
        for hi in range(h):
            j = hi // (h // kv)  # the K/V head this query head reads
            for i in range(n):
                qi = q[bi, i, hi] / math.sqrt(float((q[bi, i, hi] @ q[bi, i, hi]).detach()))
                keys = [t for t in range(n) if (not causal or t <= i) and (keep is None or keep[bi, t])]
                s = torch.tensor([g * float(qi @ (k[bi, t, j] / math.sqrt(float(k[bi, t, j] @ k[bi, t, j]))))
                                  for t in keys], dtype=x.dtype)
                w = torch.exp(s - s.max())
                w = w / w.sum()
                out[bi, i, hi] = sum(wt * v[bi, t, j] for wt, t in zip(w, keys))
    return out.reshape(b, n, h * dh) @ m.o_proj.weight.T + m.o_proj.bias


@pytest.mark.parametrize("heads,kv_heads,n,causal", [(4, 4, 7, False), (4, 2, 9, True), (2, 1, 1, True),
                                                       (4, 1, 5, False)])
def test_qk_norm_matches_equation(heads, kv_heads, n, causal):
    m, _, _ = make_op("mha", "softmax", d=16, causal=causal, heads=heads, kv_heads=kv_heads, qk_norm=True, qk_len=64)
    assert m.qk_gain.item() == pytest.approx(math.log2(64 ** 2 - 64), rel=1e-7)  # float32 at build
    perturb_params(m)
    with torch.no_grad():
        m.qk_gain.fill_(7.3)
    x = torch.randn(2, n, 16, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    torch.testing.assert_close(m(x, Ctx()), ref_qk_norm(x, m, causal), rtol=1e-10, atol=1e-10)


def test_qk_norm_is_invariant_to_the_scale_of_q_and_k():
    """Only directions reach the scores: scaling W_q and W_k (no bias) changes nothing (plain softmax would)."""
    m, _, _ = make_op("mha", "softmax", d=16, heads=2, qk_norm=True, qk_len=16, bias=False)
    perturb_params(m)
    x = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = m(x, Ctx())
    with torch.no_grad():
        m.q_proj.weight.mul_(5.0)
        m.k_proj.weight.mul_(0.1)
    torch.testing.assert_close(m(x, Ctx()), y, rtol=1e-10, atol=1e-12)


def test_qk_norm_runs_on_sdpa_with_scale_one(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention

    def spy(*a, **kw):
        seen.append(kw.get("scale"))
        return real(*a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    m, _, _ = make_op("mha", "softmax", d=16, heads=2, qk_norm=True, qk_len=32, causal=True)
    m(torch.randn(1, 5, 16, dtype=torch.float64), Ctx())
    assert seen == [1.0]


@pytest.mark.parametrize("pos", [None, ("rope", {}), ("alibi", {})])
def test_qk_norm_does_not_leak_and_keeps_padding_out(pos):
    m, _, _ = make_op("mha", "softmax", d=16, heads=2, kv_heads=1, causal=True, pos=pos, qk_norm=True, qk_len=32)
    perturb_params(m)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 11, 16, generator=g, dtype=torch.float64)
    y = m(x, Ctx())
    for t in (0, 4, 10):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn(x2[:, t + 1:].shape, generator=g, dtype=torch.float64)
        torch.testing.assert_close(m(x2, Ctx())[:, :t + 1], y[:, :t + 1], rtol=1e-12, atol=1e-12)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 7:] = False  # right padding
    ctx = Ctx(mask=mask)
    padded = m(x, ctx)
    torch.testing.assert_close(padded[1, :7], m(x[1:, :7], Ctx())[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(padded[0], y[0], rtol=1e-10, atol=1e-12)


def test_qk_norm_bidirectional_padding_against_the_equation():
    m, _, _ = make_op("mha", "softmax", d=16, heads=2, qk_norm=True, qk_len=32)
    perturb_params(m)
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, :2] = False  # left padding on the first row
    out = m(x, Ctx(mask=keep))
    torch.testing.assert_close(out[0, 2:], ref_qk_norm(x, m, False, keep)[0, 2:], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("args,message", [
    ("qk_norm=true", r"needs qk_len=L"),
    ("qk_len=64", r"qk_len is read only with qk_norm=true"),
    ("qk_norm=true, qk_len=64, scale=0.5", r"learns its score scale g"),
    ("qk_norm=true, qk_len=64, softcap=30", r"runs on SDPA, without softcap=30"),
    ("qk_norm=true, qk_len=64, collab=8", r"without collab=8"),
    ("qk_norm=true, qk_len=1", r"qk_len"),
])
def test_qk_norm_errors(args, message):
    with pytest.raises(EvoError, match=message):
        evodsl.parse(TOP + f"model m = input(features, d=16) -> mha(softmax, {args})\n")


def test_qk_norm_refuses_realformer_scores():
    with pytest.raises(EvoError, match=r"runs no RealFormer residual scores"):
        evodsl.parse(TOP + "model m = input(features, d=16) -> residual(mha(softmax, qk_norm=true, qk_len=64), "
                           "scores=true)\n")


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_onnx_export_one_file_parity_at_three_lengths(mode, tmp_path):
    """One exported file (a symbolic n) gives torch's numbers in onnxruntime at n = 7, 33 and 70 (float32), within
    1e-4 of the output's scale; g moved away from its init."""
    src = (f"d_model = 32\nheads = 4\nkv_heads = 2\nmodel m(causal={str(mode == 'causal').lower()}) = "
           "input(tokens, vocab=61) -> embed(token) -> pos(rope) -> norm -> mha(softmax, qk_norm=true, qk_len=128) "
           "-> norm -> mha(softmax, qk_norm=true, qk_len=16, kv_heads=1, bias=false) -> norm -> head(lm)\n")
    worst = exported_parity(src, tmp_path, lambda m: [p.mul_(0.7) for n, p in m.named_parameters()
                                                      if n.endswith("qk_gain")])
    print(f"onnx {mode}: max relative error {worst:.2e}")
    assert worst <= 1e-4
