"""ssm(mamba2) against the SSD recurrence (Dao and Gu 2024, Section 7), in float64, written here token by token
from the module's weights: in_proj split into z, xBC, dt; the causal depthwise convolution tap by tap, silu; per head
h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T (B, C of the head's group), y_t = h_t C_t + D_h x_t; the gated RMSNorm
over groups of E / G channels; out_proj. The chunked SSD form equals it at every chunk size (n not a multiple, n
below a chunk, one token a chunk), the export's all-chunks form too; the step form equals the forward piece by piece
with a state of constant size."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_padded_row_alone, add_noise, assert_no_leak, decode_in_pieces, exported_parity, make_op, perturb_params

D = 16


def reference(m, u):
    b, n, _ = u.shape
    E, N, H, G, P, k = m.E, m.N, m.H, m.G, m.P, m.k
    proj = u @ m.in_proj.weight.T + (0 if m.in_proj.bias is None else m.in_proj.bias)
    z, xbc, dt = proj[..., :E], proj[..., E:E + m.conv_dim], proj[..., E + m.conv_dim:]
    w = m.conv1d.weight[:, 0]
    conv = torch.zeros(b, n, m.conv_dim, dtype=u.dtype)
    for t in range(n):
        acc = torch.zeros(b, m.conv_dim, dtype=u.dtype) + (0 if m.conv1d.bias is None else m.conv1d.bias)
        for i in range(k):
            j = t - (k - 1) + i
            if j >= 0:
                acc = acc + w[:, i] * xbc[:, j]
        conv[:, t] = acc * torch.sigmoid(acc)
    x, Bm, Cm = conv[..., :E], conv[..., E:E + G * N], conv[..., E + G * N:]
    dt = F.softplus(dt + m.dt_bias)
    A = -torch.exp(m.A_log)
    y = torch.zeros(b, n, E, dtype=u.dtype)
    for hd in range(H):
        g = hd // (H // G)
        h = torch.zeros(b, P, N, dtype=u.dtype)
        for t in range(n):
            xt, Bt, Ct = x[:, t, hd * P:(hd + 1) * P], Bm[:, t, g * N:(g + 1) * N], Cm[:, t, g * N:(g + 1) * N]
            h = torch.exp(dt[:, t, hd] * A[hd])[:, None, None] * h + dt[:, t, hd, None, None] * xt[:, :, None] * Bt[:, None, :]
            y[:, t, hd * P:(hd + 1) * P] = (h * Ct[:, None, :]).sum(-1) + m.D[hd] * xt
    out = torch.zeros_like(y)
    gated = y * (z * torch.sigmoid(z))
    s = E // G
    for g in range(G):
        part = gated[..., g * s:(g + 1) * s]
        out[..., g * s:(g + 1) * s] = part / torch.sqrt((part ** 2).mean(-1, keepdim=True) + m.eps)
    out = out * m.norm_weight
    return out @ m.out_proj.weight.T + (0 if m.out_proj.bias is None else m.out_proj.bias)


ARGS = [{"N": 8, "heads": 4}, {"chunk": 4, "N": 5, "heads": 4, "groups": 2, "conv": 3, "bias": True},
        {"chunk": 7, "N": 3, "heads": 8, "groups": 8, "conv": 1, "conv_bias": False}, {"chunk": 1, "N": 2, "heads": 2}]


@pytest.mark.parametrize("args", ARGS, ids=[str(i) for i in range(len(ARGS))])
@pytest.mark.parametrize("n", [1, 5, 37])
def test_mamba2_matches_the_recurrence(args, n):
    m, _, _ = make_op("ssm", "mamba2", d=D, causal=True, **args)
    perturb_params(m)
    x = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want = reference(m, x)
        got = m(x, Ctx())
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()


def test_chunk_size_and_the_export_form_do_not_change_the_result():
    """chunk is a form: the same weights give the same outputs at every T, as one chunk, and in the export's form
    (every chunk at once, the states carried by a mask over the chunks; n not a multiple of T: padded)."""
    from evodsl.ops.ssm._mamba2_scan import ssd_chunk, ssd_export, ssd_scan

    g = torch.Generator().manual_seed(1)
    b, n, H, P, N = 2, 45, 3, 4, 5
    x = torch.randn(b, n, H, P, generator=g, dtype=torch.float64)
    dt = torch.rand(b, n, H, generator=g, dtype=torch.float64)
    B, C = (torch.randn(b, n, H, N, generator=g, dtype=torch.float64) for _ in range(2))
    A = -torch.rand(H, generator=g, dtype=torch.float64) * 3
    want, h = ssd_chunk(x, dt, A, B, C, None)
    for T in (1, 3, 8, 16, 64):
        y, hT = ssd_scan(x, dt, A, B, C, chunk=T)
        assert (y - want).abs().max().item() <= 1e-10 * want.abs().max().item()
        assert (hT - h).abs().max().item() <= 1e-10 * h.abs().max().item()
        y, _ = ssd_export(x, dt, A, B, C, T)
        assert (y - want).abs().max().item() <= 1e-10 * want.abs().max().item()


def test_the_default_init_and_heads():
    m, _, _ = make_op("ssm", "mamba2", d=64, causal=True, dtype=torch.float32)
    assert (m.E, m.H, m.P, m.N, m.G) == (128, 2, 64, 64, 1)
    assert torch.equal(m.A_log, torch.log(torch.arange(1.0, 3.0)))
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6


@pytest.mark.parametrize("args", ARGS[:3], ids=["default", "groups", "conv1"])
def test_causal_does_not_leak_and_decodes_with_a_constant_state(args):
    from costhelpers import declared

    m, _, _ = make_op("ssm", "mamba2", d=D, causal=True, **args)
    perturb_params(m)
    x = torch.randn(2, 30, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_no_leak(lambda t: m(t, Ctx()), n=20, d=D)
        want = m(x, Ctx())
        for sizes in ((5, 1, 3, 1, 20), (1,) * 30, (30,)):
            y, _ = decode_in_pieces(m, x, sizes)
            assert (y - want).abs().max().item() <= 1e-10 * want.abs().max().item()
        for t in (1, 4, 30):
            _, state = decode_in_pieces(m, x[:, :t], (1,) * t)
            _, _, cost, ev = declared("ssm", "mamba2", 2, t, dtype=torch.float64, d=D, causal=True, **args)
            assert state.nbytes() == ev(cost.cache) == 2 * (m.conv_dim * (m.k - 1) + m.E * m.N) * 8


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_enters_neither_state_nor_convolution(side):
    m, _, _ = make_op("ssm", "mamba2", d=D, causal=True, chunk=4, N=4, heads=4, groups=2)
    perturb_params(m)
    assert_padded_row_alone(m, side, d=D)


def test_validation():
    base = "vocab = 50\nd_model = 32\nmodel m(causal={c}) = input(tokens) -> embed(token) -> norm -> ssm(mamba2{a}) -> norm -> head(lm)\n"
    evodsl.parse(base.format(c="true", a=", N=8, heads=4, groups=2"))
    with pytest.raises(EvoError, match="causal only"):
        evodsl.parse(base.format(c="false", a=""))
    with pytest.raises(EvoError, match="not divisible by heads=5"):
        evodsl.parse(base.format(c="true", a=", heads=5"))
    with pytest.raises(EvoError, match="groups=3"):
        evodsl.parse(base.format(c="true", a=", heads=4, groups=3"))
    for bad in ("N=0", "expand=0", "conv=0", "chunk=0", "heads=0", "groups=0", "eps=0"):
        with pytest.raises(EvoError, match=bad.split("=")[0]):
            evodsl.parse(base.format(c="true", a=", " + bad))


@pytest.mark.slow  # ~25 s: an export (test_onnx.py exports it at its init in the default run)
def test_exports_with_a_symbolic_length(tmp_path):
    """One ONNX file (the one-chunk form), weights off their init, onnxruntime against torch's chunks at 7, 33, 70."""
    src = ("vocab = 50\nd_model = 32\nmodel m(causal=true) = input(tokens) -> embed(token) -> norm -> "
           "ssm(mamba2, N=8, heads=4, groups=2, chunk=8) -> norm -> head(lm)\n")
    worst = exported_parity(src, tmp_path, add_noise(("A_log", "dt_bias", ".D", "norm_weight"), scale=0.5))
    assert worst <= 1e-4, worst
