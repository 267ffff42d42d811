"""mha(forgetting)'s Pro block (FoX Pro: KV-shift, QK-norm, output norm, output gate; arXiv:2503.02130 and the
authors' ForgettingAttentionLayer) against a float64 reference written from the equations with explicit loops over
positions and heads (not the module's helpers); each part on its own and all together, with grouped K/V heads, one
token and n not a multiple of anything; left padding; decoding (the shift state beside the cache) in chunks and
token by token, and the cache's declared bytes against the live state; no leak; refusals."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl.decode import DecodeState
from evodsl.ops import Ctx, lookup
from evodsl.ops.cost import Symbols
from evodsl.passes.cost import _num
from ophelpers import assert_no_leak, head_projections, make_op, onnx_parity, output_projection, perturb_params

D = 32
PARTS = ("kv_shift", "qk_norm", "output_norm", "output_gate")


def rms(t, eps):
    return t / torch.sqrt((t * t).mean(-1, keepdim=True) + eps)


def reference(m, x, on, mask=None):
    """The Pro block's forward, from the weights: k~, v~ shifted by a_t = sigmoid(w . x_t) per K/V head (k~ at
    padded positions 0, k~_{-1} = 0), QK-norm (eps 1e-5), FoX's decayed causal softmax, output norm (eps 1e-6),
    output gate, o_proj."""
    q, k, v = head_projections(m, x)  # [b, n, h, dh], [b, n, kv, dh]
    b, n, h, dh = q.shape
    kv = k.shape[2]
    pro = m.pro
    if on["kv_shift"]:
        if mask is not None:
            k, v = k * mask[:, :, None, None], v * mask[:, :, None, None]
        ks, vs = torch.zeros_like(k), torch.zeros_like(v)
        for t in range(n):
            for g in range(kv):
                ak = torch.sigmoid(x[:, t] @ pro.k_shift.weight[g])[:, None]
                av = torch.sigmoid(x[:, t] @ pro.v_shift.weight[g])[:, None]
                kp = k[:, t - 1, g] if t else torch.zeros_like(k[:, 0, g])
                vp = v[:, t - 1, g] if t else torch.zeros_like(v[:, 0, g])
                ks[:, t, g] = ak * kp + (1 - ak) * k[:, t, g]
                vs[:, t, g] = av * vp + (1 - av) * v[:, t, g]
        k, v = ks, vs
    if on["qk_norm"]:
        q = rms(q, 1e-5) * pro.q_norm
        k = rms(k, 1e-5) * pro.k_norm
    log_f = torch.nn.functional.logsigmoid(x @ m.fgate.weight.T + m.fgate.bias)  # [b, n, h]
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bi in range(b):
        for i in range(n):
            keys = [j for j in range(i + 1) if mask is None or mask[bi, j]] or [i]
            for hh in range(h):
                g = hh // (h // kv)
                s = torch.stack([q[bi, i, hh] @ k[bi, j, g] / math.sqrt(dh) + log_f[bi, j + 1:i + 1, hh].sum()
                                 for j in keys])
                w = s.softmax(-1)
                out[bi, i, hh] = sum(w[a] * v[bi, j, g] for a, j in enumerate(keys))
    if on["output_norm"]:
        out = rms(out, 1e-6) * pro.o_norm
    if on["output_gate"]:
        out = out * torch.sigmoid(x @ pro.ogate.weight.T).view(b, n, h, dh)
    return output_projection(m, out.reshape(b, n, h * dh))


def build(parts, **kw):
    flags = {"pro": True} if parts == "pro" else {p: True for p in parts}
    m, params, env = make_op("mha", "forgetting", d=D, causal=True, heads=4, **flags, **kw)
    perturb_params(m)
    return m, {p: parts == "pro" or p in parts for p in PARTS}, params, env


CASES = [(("kv_shift",), 9, 2), (("qk_norm",), 9, None), (("output_norm",), 9, 1), (("output_gate",), 9, None),
         ("pro", 1, None), ("pro", 23, 2), ("pro", 17, 4)]


@pytest.mark.parametrize("parts, n, kv_heads", CASES)
def test_pro_matches_equation(parts, n, kv_heads):
    m, on, _, _ = build(parts, kv_heads=kv_heads)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference(m, x, on)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        plain = reference(m, x, {p: False for p in PARTS})
        assert (y - plain).abs().max().item() > 1e-3  # each part changes the output


def test_left_padding_matches_equation_and_each_row_alone():
    m, on, _, _ = build("pro", kv_heads=2)
    x = torch.randn(2, 12, D, dtype=torch.float64)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :5] = False
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        assert (y[1, 5:] - m(x[1:, 5:], Ctx())[0]).abs().max().item() < 1e-12
        assert (y[0] - m(x[:1], Ctx())[0]).abs().max().item() < 1e-12
        ref = reference(m, x, on, mask)
        assert (y[mask] - ref[mask]).abs().max().item() < 1e-10


def test_step_by_step_equals_forward_and_the_cache_is_declared():
    """The shift state (k~, v~ of the last position) beside the K/V cache and D: one token at a time and in chunks;
    the live state's bytes equal the cost's cache formula."""
    m, _, params, env = build("pro", kv_heads=2)
    x = torch.randn(2, 13, D, dtype=torch.float64)
    with torch.no_grad():
        want = m(x, Ctx())
        for cuts in ([1] * 13, [5, 1, 4, 3]):
            ctx, outs, t = Ctx(cache=DecodeState()), [], 0
            for c in cuts:
                ctx.offset = t
                outs.append(m(x[:, t:t + c], ctx))
                t += c
            assert (torch.cat(outs, 1) - want).abs().max().item() < 1e-12
    live = sum(t.numel() * t.element_size() for state in ctx.cache.caches.values() for t in state)  # all float64
    s = Symbols(D, 8)
    declared = _num(lookup("mha", "forgetting").cost(params, env, s).cache, s.values, 2, 13)
    assert live == declared


def test_causal_does_not_leak():
    m, _, _, _ = build("pro", kv_heads=2)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=20, d=D)


def test_parameters():
    """kv_shift: a [d -> kv] gate each for k and v; qk_norm: h dh + kv dh gains; output_norm: h dh; gate: d x h dh."""
    base = sum(p.numel() for p in make_op("mha", "forgetting", d=D, causal=True, heads=4, kv_heads=2)[0].parameters())
    for parts, extra in ((("kv_shift",), 2 * D * 2), (("qk_norm",), D + D // 2), (("output_norm",), D),
                         (("output_gate",), D * D), ("pro", 4 * D + D + D // 2 + D + D * D)):
        m, _, _, _ = build(parts, kv_heads=2)
        assert sum(p.numel() for p in m.parameters()) - base == extra, parts


def test_onnx_export_one_file_parity_at_three_lengths(tmp_path):
    """The Pro block exported once (a symbolic n: the shift's pad and slice, no branch on n) gives torch's numbers in
    onnxruntime at n = 7, 33 and 70, within 1e-4 of the output's scale (float32)."""

    import evodsl

    src = ("d_model = 32\nheads = 4\nmodel m(causal=true) = input(tokens, vocab=61) -> embed(token)"
           " -> norm -> mha(forgetting, pro=true, kv_heads=2) -> norm -> ffn -> norm -> head(lm)\n")
    path = tmp_path / "m.onnx"
    evodsl.export(src, path)
    graph, model = evodsl.parse(src), evodsl.compile(src)
    worst = onnx_parity(path, graph, model)
    print(f"onnx forgetting pro: max relative error {worst:.2e}")
    assert worst <= 1e-4


def test_bad_values_are_refused():
    import evodsl
    from evodsl import EvoError

    src = "d_model = 32\nheads = 4\nmodel m(causal=true) = input(tokens, vocab=11) -> embed(token) -> mha(forgetting, {}) -> head(lm)\n"
    with pytest.raises(EvoError, match=r"E204.*invalid value 2 for parameter 'pro'"):
        evodsl.parse(src.format("pro=2"))
    with pytest.raises(EvoError, match=r"E203.*unknown parameter 'k_shift'"):
        evodsl.parse(src.format("k_shift=true"))
