"""ssm(mamba) against the paper's recurrence (Gu and Dao 2023, Algorithm 2), in float64, written here token by token
from the module's weights: in_proj, the causal depthwise convolution tap by tap, silu, x_proj, softplus(dt_proj),
then per channel e and state n h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t . h_t + D x_t, gated by silu(z),
out_proj. The chunked scan equals it at every chunk size (n not a multiple, n below a chunk, one token a chunk);
the step form equals the forward piece by piece with a state of constant size."""
from __future__ import annotations

import math

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
    E, N, R, k = m.E, m.N, m.R, m.k
    xz = u @ m.in_proj.weight.T + (0 if m.in_proj.bias is None else m.in_proj.bias)
    x, z = xz[..., :E], xz[..., E:]
    w = m.conv1d.weight[:, 0]  # [E, k]: tap i reads position t - (k - 1) + i
    xs = torch.zeros(b, n, E, dtype=u.dtype)
    for t in range(n):
        acc = torch.zeros(b, E, dtype=u.dtype) + (0 if m.conv1d.bias is None else m.conv1d.bias)
        for i in range(k):
            j = t - (k - 1) + i
            if j >= 0:
                acc = acc + w[:, i] * x[:, j]
        xs[:, t] = acc * torch.sigmoid(acc)
    proj = xs @ m.x_proj.weight.T
    dt = F.softplus(proj[..., :R] @ m.dt_proj.weight.T + m.dt_proj.bias)
    Bm, Cm = proj[..., R:R + N], proj[..., R + N:]
    A = -torch.exp(m.A_log)
    h = torch.zeros(b, E, N, dtype=u.dtype)
    y = torch.zeros(b, n, E, dtype=u.dtype)
    for t in range(n):
        h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * Bm[:, t, None, :] * xs[:, t, :, None]
        y[:, t] = (h * Cm[:, t, None, :]).sum(-1) + m.D * xs[:, t]
    y = y * (z * torch.sigmoid(z))
    return y @ m.out_proj.weight.T + (0 if m.out_proj.bias is None else m.out_proj.bias)


ARGS = [{}, {"chunk": 4, "N": 5, "expand": 1, "conv": 3, "dt_rank": 3, "bias": True},
        {"chunk": 7, "conv": 1, "conv_bias": False}, {"chunk": 1, "N": 2}]


@pytest.mark.parametrize("args", ARGS, ids=[str(i) for i in range(len(ARGS))])
@pytest.mark.parametrize("n", [1, 5, 37])
def test_mamba_matches_the_recurrence(args, n):
    m, _, _ = make_op("ssm", "mamba", d=D, causal=True, **args)
    perturb_params(m)
    x = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want = reference(m, x)
        got = m(x, Ctx())
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()


def test_the_chunk_size_does_not_change_the_result():
    """chunk is a form, not a parameter of the model: the same weights give the same outputs at every T."""
    x = torch.randn(2, 45, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    outs = []
    for T in (1, 3, 8, 16, 64):
        m, _, _ = make_op("ssm", "mamba", d=D, causal=True, chunk=T)
        perturb_params(m)
        with torch.no_grad():
            outs.append(m(x, Ctx()))
    for o in outs[1:]:
        assert (o - outs[0]).abs().max().item() <= 1e-10 * outs[0].abs().max().item()


def test_the_default_init_is_s4d_real_and_dt_in_range():
    m, _, _ = make_op("ssm", "mamba", d=32, causal=True, dtype=torch.float32)
    assert m.R == 2 and m.E == 64
    assert torch.equal(m.A_log[3], torch.log(torch.arange(1, 17, dtype=torch.float32)))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert torch.equal(m.D, torch.ones(64))


@pytest.mark.parametrize("args", ARGS[:3], ids=["default", "small", "conv1"])
def test_causal_does_not_leak_and_decodes_with_a_constant_state(args):
    """The step form equals the forward piece by piece (single tokens, chunks, a prompt); its state is the
    declared kv_cache, the same at every length."""
    from costhelpers import declared

    m, _, _ = make_op("ssm", "mamba", d=D, causal=True, **args)
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
            _, _, cost, ev = declared("ssm", "mamba", 2, t, dtype=torch.float64, d=D, causal=True, **args)
            assert state.nbytes() == ev(cost.cache) == 2 * m.E * (m.k - 1 + m.N) * 8


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_enters_neither_state_nor_convolution(side):
    m, _, _ = make_op("ssm", "mamba", d=D, causal=True, chunk=4)
    perturb_params(m)
    assert_padded_row_alone(m, side, d=D)


def test_validation():
    base = "vocab = 50\nd_model = 32\nmodel m(causal={c}) = input(tokens) -> embed(token) -> norm -> ssm(mamba{a}) -> norm -> head(lm)\n"
    evodsl.parse(base.format(c="true", a=", dt_rank=4, N=8"))
    with pytest.raises(EvoError, match="causal only"):
        evodsl.parse(base.format(c="false", a=""))
    for bad in ("N=0", "expand=0", "conv=0", "chunk=0", "dt_rank=0", "dt_rank=full"):
        with pytest.raises(EvoError, match=bad.split("=")[0]):
            evodsl.parse(base.format(c="true", a=", " + bad))


def test_dt_rank_auto_is_ceil_d_over_16():
    m, _, _ = make_op("ssm", "mamba", d=40, causal=True)
    assert m.R == math.ceil(40 / 16) == 3 and m.dt_proj.weight.shape == (m.E, 3)


def test_the_export_form_equals_the_chunked_scan():
    """exported_scan (a symbolic n: doubling on (decay, state) pairs over the whole sequence) is the same map."""
    from evodsl.ops.ssm._mamba_scan import exported_scan, selective_scan

    g = torch.Generator().manual_seed(2)
    b, n, E, N = 2, 45, 6, 3
    dt, x = torch.rand(b, n, E, generator=g, dtype=torch.float64), torch.randn(b, n, E, generator=g, dtype=torch.float64)
    B, C = (torch.randn(b, n, N, generator=g, dtype=torch.float64) for _ in range(2))
    A = -torch.rand(E, N, generator=g, dtype=torch.float64) * 3
    want, _ = selective_scan(dt, A, B, C, x, chunk=8)
    got, _ = exported_scan(dt, A, B, C, x)
    assert (got - want).abs().max().item() <= 1e-12 * want.abs().max().item()


def scan_reference(dt, A, B, C, x, h0):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t, y_t = C_t . h_t, token by token (autograd through the loop)."""
    h, ys = h0, []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, 1), h


@pytest.mark.parametrize("n", [1, 6, 37])
@pytest.mark.parametrize("T", [1, 4, 16, 64])
@pytest.mark.parametrize("with_h0", [False, True])
def test_the_scan_gradients_equal_the_token_loop(n, T, with_h0):
    """The scan's Function (a forward that keeps chunk carries, a backward by the reverse recurrence and closed
    forms) against autograd through the token loop: y and the last state, and the gradients of dt, A, B, C, x and
    h0 under random output and last-state gradients, at chunk sizes dividing n, not, and past it."""
    from evodsl.ops.ssm._mamba_scan import selective_scan

    g = torch.Generator().manual_seed(10 * n + T)
    b, E, N = 2, 5, 3
    f64 = dict(generator=g, dtype=torch.float64)
    dt, x = torch.rand(b, n, E, **f64), torch.randn(b, n, E, **f64)
    B, C = torch.randn(b, n, N, **f64), torch.randn(b, n, N, **f64)
    A = -torch.rand(E, N, **f64) * 3
    h0 = torch.randn(b, E, N, **f64) if with_h0 else torch.zeros(b, E, N, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (dt, A, B, C, x, h0)]
    dy, dh = torch.randn(b, n, E, **f64), torch.randn(b, E, N, **f64)
    results = []
    for run in (lambda: scan_reference(*leaves), lambda: selective_scan(*leaves[:5], h0 if with_h0 else None, T)):
        y, h = run()
        grads = torch.autograd.grad((y * dy).sum() + (h * dh).sum(), leaves, allow_unused=True)
        results.append((y, h, *grads))
    for name, want, got in zip(("y", "h", "dt", "A", "B", "C", "x", "h0"), *results):
        if name == "h0" and not with_h0:
            assert got is None
            continue
        assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item(), name


@pytest.mark.slow  # ~25 s: an export (test_onnx.py exports it at its init in the default run)
def test_exports_with_a_symbolic_length(tmp_path):
    """One ONNX file (the doubling form), weights off their init (A, dt's bias, D, the projections), onnxruntime
    against torch's chunked scan at n = 7, 33, 70."""
    src = ("vocab = 50\nd_model = 32\nmodel m(causal=true) = input(tokens) -> embed(token) -> norm -> "
           "ssm(mamba, N=8, chunk=8) -> norm -> head(lm)\n")
    worst = exported_parity(src, tmp_path, add_noise(("A_log", "dt_proj.bias", ".D", "x_proj.weight"), scale=0.5))
    assert worst <= 1e-4, worst
