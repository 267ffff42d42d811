"""Collaborative heads (2006.16362) on mha(softmax) and mha(local): shared W_Q, W_K of width D_k, per-head mixing vectors m_i and
the content bias, against a float64 reference written from the equation (per head, einsums); with the
"concatenate" mixing and D_k = h dh it is plain multi-head attention (the paper's reparametrisation); padding,
leaks, what is refused, export (decoding: tests/test_decode.py; cost: tests/ops/test_cost_attention.py)."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import add_noise, assert_no_leak, exported_parity, make_op, perturb_params

D = 32


def reference(m, x, causal, Dk, scale=None, key_mask=None, window=None):
    """s_i(t, r) = ((x_t W_Q) diag(m_i) (x_r W_K)^T + x_r w_i) * scale (default 1/sqrt(D_k / h)), masked (causal:
    r <= t; local: |t - r| < w; padded keys out, a query left with none reads its own), o_i = softmax_r(s_i) V_i
    (value head i // g), then W_O."""
    b, n, _ = x.shape
    h, kv = m.heads, m.kv_heads
    dh = m.head_dim
    scale = scale or 1 / math.sqrt(Dk / h)
    q, k = x @ m.q_proj.weight.T, x @ m.k_proj.weight.T
    v = (x @ m.v_proj.weight.T + (0 if m.v_proj.bias is None else m.v_proj.bias)).view(b, n, kv, dh)
    t, r = torch.arange(n)[:, None], torch.arange(n)[None, :]
    keep = (r <= t) if causal else torch.ones(n, n, dtype=torch.bool)
    if window is not None:
        keep = keep & ((t - r).abs() < window)
    keep = keep.expand(b, n, n)
    if key_mask is not None:
        keep = keep & key_mask[:, None, :]
        keep = keep | ((t == r) & ~keep.any(-1, keepdim=True))
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for i in range(h):
        s = torch.einsum("btc,c,brc->btr", q, m.collab.mixing[i], k)
        if m.collab.content is not None:
            s = s + (x @ m.collab.content.weight[i])[:, None, :]
        w = (s * scale).masked_fill(~keep, float("-inf")).softmax(-1)
        out[:, :, i] = w @ v[:, :, i // (h // kv)]
    return out.reshape(b, n, h * dh) @ m.o_proj.weight.T + (0 if m.o_proj.bias is None else m.o_proj.bias)


CASES = [  # causal, n, build: D_k above h dh, equal, below dh (q and k padded); GQA on the values
    (False, 9, {"collab": 40}), (True, 70, {"collab": 24}), (True, 33, {"collab": 16, "kv_heads": 2}),
    (False, 5, {"collab": 4, "kv_heads": 1, "bias": False}), (True, 1, {"collab": 12}),
    (True, 20, {"collab": 48, "heads": 2, "head_dim": 6, "bias": False, "scale": 0.3}),
]


@pytest.mark.parametrize("causal, n, build", CASES)
def test_collab_heads_match_equation(causal, n, build):
    build = {"heads": 4, **build}
    m, _, _ = make_op("mha", "softmax", d=D, causal=causal, **build)
    perturb_params(m)  # the mixing vectors random: every head reads every shared column
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference(m, x, causal, build["collab"], build.get("scale"))
    assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


LOCAL_CASES = [  # mha(local, window=w, collab=D_k): causal, n, build; the band in blocks (n no multiple of 32), the
    # window past n (one call), n = 1, D_k below dh (q and k padded), GQA on the values, scale=
    (True, 70, {"window": 6, "collab": 24}), (False, 70, {"window": 6, "collab": 40, "kv_heads": 2}),
    (True, 45, {"window": 40, "collab": 16, "kv_heads": 2}), (False, 10, {"window": 16, "collab": 4, "kv_heads": 1, "bias": False}),
    (True, 1, {"window": 3, "collab": 12}), (True, 33, {"window": 5, "collab": 48, "heads": 2, "head_dim": 6, "scale": 0.3}),
    (False, 50, {"window": 9, "collab": 8, "bias": False}),
]


@pytest.mark.parametrize("causal, n, build", LOCAL_CASES)
def test_collab_heads_on_local_match_equation(causal, n, build):
    """The same scores over the window: the band's SDPA at width W, its 1/sqrt(W) undone on q."""
    build = {"heads": 4, **build}
    m, _, _ = make_op("mha", "local", d=D, causal=causal, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference(m, x, causal, build["collab"], build.get("scale"), window=build["window"])
        full = reference(m, x, causal, build["collab"], build.get("scale"))
    assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
    if n > build["window"] + 1:
        assert (ref - full).abs().max().item() > 1e-3  # the window is seen


@pytest.mark.parametrize("causal", [False, True])
def test_collab_local_gradients_match_the_reference(causal):
    """The training form (the blocked band under autograd): the gradients of the input and the mixing vectors."""
    m, _, _ = make_op("mha", "local", d=D, causal=causal, heads=4, kv_heads=2, window=5, collab=20)
    perturb_params(m)
    x = torch.randn(2, 70, D, dtype=torch.float64, requires_grad=True)
    grads = []
    for fn in (lambda: m(x, Ctx()), lambda: reference(m, x, causal, 20, window=5)):
        m.zero_grad()
        x.grad = None
        fn().pow(2).sum().backward()
        grads.append((x.grad.clone(), m.collab.mixing.grad.clone(), m.collab.content.weight.grad.clone()))
    for got, want in zip(*grads):
        assert (got - want).abs().max().item() < 1e-9 * want.abs().max().item()


@pytest.mark.parametrize("causal", [False, True])
def test_concatenate_mixing_is_plain_mha(causal):
    """D_k = h dh, m_i the indicator of head i's columns (the initial mixing), no content bias: plain mha with the
    same W_Q, W_K (no biases), W_V, W_O; scale 1/sqrt(D_k / h) = 1/sqrt(dh)."""
    m, _, _ = make_op("mha", "softmax", d=D, causal=causal, heads=4, kv_heads=2, collab=32, bias=False)
    plain, _, _ = make_op("mha", "softmax", d=D, causal=causal, heads=4, kv_heads=2, bias=False)
    perturb_params(m)
    with torch.no_grad():
        m.collab.mixing.copy_(torch.eye(4).repeat_interleave(8, 1))
        for name in ("q_proj", "v_proj", "o_proj"):
            getattr(plain, name).weight.copy_(getattr(m, name).weight)
        plain.k_proj.weight.copy_(m.k_proj.weight.view(4, 8, D)[::2].reshape(16, D))  # kv heads 0, 1: columns 0-7, 16-23
        m.k_proj.weight.view(4, 8, D)[1::2] = m.k_proj.weight.view(4, 8, D)[::2]  # head 2i+1 reads kv head i
        x = torch.randn(2, 40, D, dtype=torch.float64)
        y, want = m(x, Ctx()), plain(x, Ctx())
    assert want.abs().max().item() > 0.1
    assert (y - want).abs().max().item() < 1e-12


@pytest.mark.parametrize("variant, build", [("softmax", {}), ("local", {"window": 6})])
@pytest.mark.parametrize("causal", [False, True])
def test_padding_keeps_every_sequence_alone(variant, build, causal):
    m, _, _ = make_op("mha", variant, d=D, causal=causal, heads=4, kv_heads=2, collab=20, **build)
    perturb_params(m)
    x = torch.randn(3, 40, D, dtype=torch.float64)
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[1, 25:] = False  # right
    mask[2, :12] = False  # left
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        ref = reference(m, x, causal, 20, key_mask=mask, window=build.get("window"))
        assert (y - ref)[mask].abs().max().item() < 1e-10
        for row in range(3):
            alone = m(x[row:row + 1, mask[row]], Ctx())
            assert (y[row, mask[row]] - alone[0]).abs().max().item() < 1e-10


@pytest.mark.parametrize("variant, build", [("softmax", {}), ("local", {"window": 5})])
def test_causal_does_not_leak(variant, build):
    m, _, _ = make_op("mha", variant, d=D, causal=True, heads=4, kv_heads=2, collab=20, **build)
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=70 if variant == "local" else 24, d=D)  # local: the band's blocks


def test_refusals_are_evo_errors():
    import evodsl

    head = "d_model = 32\nmodel m(causal=true) = input(tokens, vocab=50) -> embed -> "
    cases = [("mha(chunk, collab=16)", r"(?s)E203.*unknown parameter 'collab' for mha\(chunk\)"),
             ("pos(alibi) -> mha(local, collab=16)", r"(?s)collab=16 takes no position scheme inside attention.*pos\(alibi\)"),
             ("mha(local, collab=16, sinks=2)", r"(?s)takes none of the other modifiers \(sinks=2\)"),
             ("pos(rope) -> mha(softmax, collab=16)", r"(?s)collab=16 takes no position scheme inside attention.*pos\(rope\)"),
             ("mha(softmax, collab=16, talking=true)", r"(?s)takes none of the other modifiers \(talking=true\)"),
             ("residual(norm -> mha(softmax, collab=16), scores=true)", r"(?s)residual scores"),
             ("mha(softmax, collab=0)", r"(?s)collab")]
    for chain, message in cases:
        with pytest.raises(EvoError, match=message):
            evodsl.compile(evodsl.parse(f"{head}{chain} -> head(lm)\n"))


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_onnx_export_one_file_parity_at_three_lengths(mode, tmp_path):
    """One exported file (a symbolic n) gives torch's numbers in onnxruntime at n = 7, 33 and 70 (float32), within
    1e-4 of the output's scale; the mixing vectors perturbed."""

    src = (f"d_model = 32\nheads = 4\nkv_heads = 2\nmodel m(causal={str(mode == 'causal').lower()}) = "
           "input(tokens, vocab=61) -> embed(token) -> pos(learned, max_len=128) -> norm -> mha(softmax, collab=24) "
           "-> norm -> mha(softmax, collab=8, bias=false) -> norm -> mha(local, window=5, collab=20) -> norm -> head(lm)\n")
    worst = exported_parity(src, tmp_path, add_noise(("collab.mixing",)))
    print(f"onnx {mode}: max relative error {worst:.2e}")
    assert worst <= 1e-4


@pytest.mark.slow  # ~30 s each on a shared machine
@pytest.mark.parametrize("causal", [True, False])
def test_collab_heads_grow_as_declared(causal):
    """tests/growth.py at n = 512..4k: FLOPs quadratic (n^2 (D_k + h) per head), the peak linear (SDPA's fused
    kernel: no [n, n] tensor), forward and backward."""
    from growth import TOL, _compare, mha_growth

    ns, args = (512, 1024, 2048, 4096), {"collab": 40, "kv_heads": 1}

    got, flops, peak, bwd = mha_growth("softmax", causal, ns, **args)
    problems = _compare("FLOPs", got.flops, flops, TOL) + _compare("peak bytes", got.peak, peak, TOL)
    problems += _compare("backward FLOPs", got.bwd_flops, bwd, TOL)
    assert not problems, "; ".join(problems)


@pytest.mark.slow  # ~15 s each on a shared machine
@pytest.mark.parametrize("causal", [True, False])
def test_collab_heads_on_local_grow_as_declared(causal):
    """tests/growth.py at n = 1k..8k: the band's FLOPs and bytes linear in n at width W (no n x n tensor)."""
    from growth import check_growth, mha_growth

    got, flops, peak, bwd = mha_growth("local", causal, window=64, collab=40, kv_heads=1)
    check_growth(f"mha(local, window=64, collab=40) {'causal' if causal else 'bidirectional'}", got, flops, peak, bwd)
