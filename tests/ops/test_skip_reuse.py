"""mha(skip_reuse) (Skip-Attention) against its defining equation, in float64: Phi(z) = ECA(FC2(DwC(FC1(z)))),
written here position by position from the weights (GELU from erf, the depthwise convolution as a loop over its
taps with zeros outside the sequence, ECA's mean over the tokens, over 0..t when causal, and its channel
convolution as a loop), alone and in models where it reuses the previous attention sublayer's output (a softmax
attention written from its equation), chaining when consecutive layers skip, through repeat copies. Then: the
pass's E312 (no earlier attention in the stream), validation errors, the causal form's leak test, padding, and one
ONNX file at three lengths. Decoding (test_decode.py), growth, cost and padding rows live in the harnesses."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from costhelpers import declared
from ophelpers import assert_no_leak, decode_in_pieces, exported_parity, make_op, perturb_params

D = 16


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def phi(m, z, causal, mask=None):
    """Phi(z) [b, n, d] from the module's weights alone."""
    b, n, d = z.shape
    k, ke = m.dwc.weight.shape[-1], m.eca.weight.shape[-1]
    h = gelu(torch.einsum("bnd,ed->bne", z, m.fc1.weight) + (0 if m.fc1.bias is None else m.fc1.bias))
    if mask is not None:
        h = h * mask[..., None]
    p = k - 1 if causal else (k - 1) // 2  # taps before the position
    wc = m.dwc.weight[:, 0, :]  # [E, k]
    c = torch.zeros_like(h)
    for t in range(n):
        acc = torch.zeros(b, h.shape[-1], dtype=z.dtype) + (0 if m.dwc.bias is None else m.dwc.bias)
        for j in range(k):
            if 0 <= t - p + j < n:
                acc = acc + wc[:, j] * h[:, t - p + j]
        c[:, t] = gelu(acc)
    y = torch.einsum("bne,de->bnd", c, m.fc2.weight) + (0 if m.fc2.bias is None else m.fc2.bias)
    real = torch.ones(b, n, dtype=z.dtype) if mask is None else mask.to(z.dtype)
    we, pe = m.eca.weight[0, 0], (ke - 1) // 2
    out = torch.zeros_like(y)
    for i in range(b):
        for t in range(n):
            upto = t + 1 if causal else n
            count = real[i, :upto].sum()
            mean = (y[i, :upto] * real[i, :upto, None]).sum(0) / max(count.item(), 1.0)
            gate = torch.zeros(d, dtype=z.dtype)
            for ch in range(d):
                gate[ch] = sum(we[j] * mean[ch - pe + j] for j in range(ke) if 0 <= ch - pe + j < d)
            out[i, t] = y[i, t] * torch.sigmoid(gate)
    return out


CASES = [  # causal, n, k, k_eca, expand, bias
    (False, 13, 3, 3, 2, True), (True, 13, 3, 3, 2, True),  # the defaults; n no multiple of k
    (False, 10, 4, 5, 1, False), (True, 10, 4, 5, 1, False),  # an even k (bidirectional: 1 zero before, 2 after)
    (True, 9, 1, 1, 3, True), (False, 9, 1, 1, 3, True),  # no mixing over positions; a one-tap ECA
    (True, 3, 7, 3, 2, True), (False, 2, 7, 3, 2, True),  # n smaller than the kernel
    (True, 1, 3, 3, 2, False),  # one token
]


@pytest.mark.parametrize("causal, n, k, k_eca, expand, bias", CASES)
def test_skip_reuse_matches_equation(causal, n, k, k_eca, expand, bias):
    m, _, _ = make_op("mha", "skip_reuse", d=D, causal=causal, k=k, k_eca=k_eca, expand=expand, bias=bias)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), phi(m, x, causal)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        if n > 1:  # the comparison sees the form: the other one differs
            assert (y - phi(m, x, not causal)).abs().max().item() > 1e-6


def softmax_attention(m, x, causal):
    """Multi-head softmax attention from the module's weights alone: [b, n, d]."""
    b, n, _ = x.shape
    h, dh = m.heads, m.head_dim

    def proj(layer):
        return (x @ layer.weight.T + layer.bias).view(b, n, h, dh)

    q, k, v = proj(m.q_proj), proj(m.k_proj), proj(m.v_proj)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(dh)
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v).reshape(b, n, h * dh)
    return o @ m.o_proj.weight.T + m.o_proj.bias


def _model(body: str, causal: bool):
    src = f"d_model = {D}\nheads = 4\nmodel m(causal={str(causal).lower()}) = input(features, d={D}) -> {body}\n"
    model = evodsl.compile(src, dtype=torch.float64)
    perturb_params(model)
    return model


@pytest.mark.parametrize("causal", [False, True])
def test_three_layers_two_skipping_chain_phi(causal):
    """Z1 = x + A(x); Z2 = Z1 + Phi2(A(x)); Z3 = Z2 + Phi3(Phi2(A(x))): each skipping layer reads the previous
    attention sublayer's output, the second one the first one's Phi (the paper's chaining), never its own input."""
    model = _model("mha -> mha(skip_reuse, k=5) -> mha(skip_reuse, k_eca=5, expand=1)", causal)
    x = torch.randn(2, 11, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        a = softmax_attention(model.attn1, x, causal)
        p2 = phi(model.attn2, a, causal)
        p3 = phi(model.attn3, p2, causal)
        want = x + a + p2 + p3
        assert (model(x) - want).abs().max().item() < 1e-10 * want.abs().max().item()
        # the control: Phi over each layer's own input gives other numbers
        own = x + a + phi(model.attn2, x + a, causal)
        assert (model(x) - (own + phi(model.attn3, own, causal))).abs().max().item() > 1e-3


def test_repeat_copies_chain_through_the_previous_copy():
    """repeat(mha(skip_reuse), 3) after an attention: copy 1 reads it, copies 2 and 3 the copy before; the
    attention after the repeat starts afresh and the skip after it reads that one."""
    model = _model("norm -> mha -> repeat(norm -> mha(skip_reuse), 3) -> norm -> mha -> mha(skip_reuse)", True)
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        z = model.norm1(x)
        prev = softmax_attention(model.attn1, z, True)
        h = x + prev
        for block in model.blocks:
            h = h + (prev := phi(block.attn, prev, True))
        a = softmax_attention(model.attn2, model.norm2(h), True)  # norm3: attn3's pre-norm, unread
        want = h + a + phi(model.attn3, a, True)
        assert (model(x) - want).abs().max().item() < 1e-10 * want.abs().max().item()


NO_ATTENTION = [
    ("norm -> mha(skip_reuse) -> norm -> ffn", 1),
    # the repeat's second copy would have one; its first copy has none
    ("repeat(norm -> mha(skip_reuse) -> norm -> mha, 2)", 1),
]


@pytest.mark.parametrize("body, count", NO_ATTENTION)
def test_no_earlier_attention_is_e312(body, count):
    src = f"d_model = {D}\nmodel m = input(features, d={D}) -> {body}\n"
    with pytest.raises(EvoError) as err:
        evodsl.parse(src)
    assert len(err.value.diagnostics) == count
    lines = str(err.value).splitlines()
    col = src.splitlines()[1].index("mha(skip_reuse)") + 1
    assert lines[0] == f"<string>:2:{col}: error[E312]: mha(skip_reuse) has no earlier attention to reuse"
    assert lines[3].index("^" * len("mha(skip_reuse)")) == lines[2].index("mha(skip_reuse)")  # the caret
    assert lines[4].startswith("  = help: put a layer with attention before it")


def test_an_attention_in_another_stream_is_not_reused():
    src = (f"d_model = {D}\nmodel m {{ x = input(features, d={D}) -> norm -> mha  "
           f"y = x -> norm -> mha(skip_reuse) -> head(linear, d_out=4) }}\n")
    with pytest.raises(EvoError, match=r"E312\]: mha\(skip_reuse\) has no earlier attention to reuse in stream 'y'"):
        evodsl.parse(src)
    ok = src.replace("y = x -> norm -> mha(skip_reuse)", "y = x -> norm -> mha -> mha(skip_reuse)")
    model = evodsl.compile(ok, dtype=torch.float64)
    perturb_params(model)
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        xs = x + softmax_attention(model.x_attn, model.x_norm(x), False)
        a = softmax_attention(model.y_attn1, model.y_norm1(xs), False)
        h = xs + a
        h = h + phi(model.y_attn2, a, False)
        want = model.y_head(h)
        assert (model(x) - want).abs().max().item() < 1e-10 * want.abs().max().item()


@pytest.mark.parametrize("args, message", [
    ("k_eca=4", r"E300\].*k_eca=4 is even"),
    ("k=0", r"E204\].*invalid value 0 for parameter 'k'"),
    ("expand=0", r"E204\].*invalid value 0 for parameter 'expand'"),
    ("window=3", r"E203\].*unknown parameter 'window'"),
])
def test_bad_params_are_refused(args, message):
    with pytest.raises(EvoError, match=message):
        evodsl.parse(f"d_model = {D}\nmodel m = input(features, d={D}) -> mha -> mha(skip_reuse, {args})\n")


def test_causal_does_not_leak_and_bidirectional_does():
    m, _, _ = make_op("mha", "skip_reuse", d=D, causal=True, k=5, k_eca=5)
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=23, d=D)  # 23 positions: several kernels of 5
    m, _, _ = make_op("mha", "skip_reuse", d=D, causal=False)
    with torch.no_grad(), pytest.raises(AssertionError, match="changed by"):
        assert_no_leak(lambda x: m(x, Ctx()), n=8, d=D)


@pytest.mark.parametrize("k, expand", [(3, 2), (5, 1), (1, 2)])
def test_decoding_in_pieces_equals_the_forward_and_keeps_the_declared_state(k, expand):
    """A prompt, then single tokens and chunks: the forward's outputs; the state is the last k - 1 FC1 outputs
    and the running sum of y, exactly the declared cache (O(1) in n)."""
    m, _, _ = make_op("mha", "skip_reuse", d=D, causal=True, k=k, expand=expand)
    perturb_params(m)
    x = torch.randn(2, 17, D, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    with torch.no_grad():
        y, state = decode_in_pieces(m, x, [4, 1, 1, 5, 1, 3, 2])
        assert (y - m(x, Ctx())).abs().max().item() < 1e-10
    _, _, cost, ev = declared("mha", "skip_reuse", 2, 17, dtype=torch.float64, d=D, causal=True, k=k, expand=expand)
    assert state.nbytes() == ev(cost.cache) == 2 * ((k - 1) * expand * D + D) * 8


@pytest.mark.parametrize("causal", [False, True])
def test_padded_rows_equal_the_equation_over_their_tokens(causal):
    """Right and left padding: Phi of the padded batch equals the reference over the mask (FC1's outputs zeroed
    at padding, ECA's mean over tokens), and each row's tokens equal the row alone."""
    m, _, _ = make_op("mha", "skip_reuse", d=D, causal=causal, k=4)
    perturb_params(m)
    x = torch.randn(3, 12, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 8:] = False
    mask[2, :5] = False  # left padding
    x[~mask] = 100.0
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        assert (y - phi(m, x, causal, mask)).abs()[mask].max().item() < 1e-10
        for i in range(3):
            alone = m(x[i:i + 1, mask[i]], Ctx())
            assert (y[i, mask[i]] - alone[0]).abs().max().item() < 1e-10


# causal: tests/test_onnx.py's case for the op (its own model, TOKEN_MODELS) exports it too; here slow (~8 s)
@pytest.mark.parametrize("causal", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_onnx_export_one_file_parity_at_three_lengths(causal, tmp_path):
    """One exported file (a symbolic n) gives torch's numbers in onnxruntime at n = 7, 33 and 70 (float32)."""
    src = (f"d_model = 32\nheads = 4\nmodel m(causal={str(causal).lower()}) = input(tokens, vocab=61) -> "
           "embed(token) -> pos(learned, max_len=128) -> norm -> mha -> norm -> ffn -> norm -> mha(skip_reuse, k=5) "
           "-> norm -> mha(skip_reuse, bias=false) -> norm -> head(lm)\n")
    worst = exported_parity(src, tmp_path, lambda m: perturb_params(m, scale=0.2))
    print(f"onnx causal={causal}: max relative error {worst:.2e}")
    assert worst <= 1e-4
