"""ssm(s4d) against the paper's recurrence (Gu et al. 2022, S4D, Eq. 1 and its ZOH discretisation), in float64,
written here token by token from the module's parameters: A = -exp(log_A_real) + i A_imag, dt = exp(log_dt),
dA = exp(dt A), B_bar = (dA - 1) / A, h_t = dA h_{t-1} + x_t, y_t = 2 Re(C B_bar . h_t) (the anticausal branch
of a bidirectional layer: g_t = dA g_{t+1} + x_{t+1}), then D x, GELU and the output GLU. The kernel equals the
paper's formula K_l = 2 Re(C B_bar dA^l); the step form equals the forward piece by piece with a constant state."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_no_leak, assert_padded_row_alone, decode_in_pieces, make_op, perturb_params

D = 8


def modes(m):
    k = m.kernel
    A = -torch.exp(k.log_A_real) + 1j * k.A_imag
    dt = torch.exp(k.log_dt)[:, None]
    dA = torch.exp(dt * A)
    return dA, (k.C[..., 0] + 1j * k.C[..., 1]) * (dA - 1) / A  # [H, M], [c, H, M]


def reference(m, u):
    b, n, d = u.shape
    dA, CB = modes(m)
    x = u.transpose(1, 2)  # [b, d, n]
    y = torch.zeros_like(x)
    h = torch.zeros(b, d, dA.shape[1], dtype=torch.complex128)
    for t in range(n):
        h = dA * h + x[:, :, t, None]
        y[:, :, t] = 2 * (CB[0] * h).sum(-1).real
    if not m.causal:
        g = torch.zeros_like(h)
        for t in range(n - 1, -1, -1):
            y[:, :, t] += 2 * (CB[1] * g).sum(-1).real
            g = dA * g + x[:, :, t, None]
    y = F.gelu(y + m.D[:, None] * x).transpose(1, 2)
    y = y @ m.out.weight.T + m.out.bias
    return F.glu(y, -1) if m.glu else y


CASES = [(True, {"N": 8}), (True, {"N": 2, "glu": False}), (False, {"N": 8}), (False, {"N": 6, "glu": False})]


@pytest.mark.parametrize("causal,args", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("n", [1, 6, 37])
def test_s4d_matches_the_recurrence(causal, args, n):
    m, _, _ = make_op("ssm", "s4d", d=D, causal=causal, **args)
    perturb_params(m)
    x = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want, got = reference(m, x), m(x, Ctx())
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()


def test_the_kernel_is_the_papers_formula():
    m, _, _ = make_op("ssm", "s4d", d=D, causal=False, N=6)
    perturb_params(m)
    dA, CB = modes(m)
    with torch.no_grad():
        K = m.kernel(11)
    for c in range(2):
        for l in range(11):
            want = 2 * (CB[c] * dA ** l).sum(-1).real
            assert (K[c, :, l] - want).abs().max().item() <= 1e-12 * want.abs().max().item()


def dense_kernel(k, n):
    """K_l = 2 Re(sum_j C~_j dA_j^l) [c, H, n], the whole complex Vandermonde at once (differentiable)."""
    A = -torch.exp(k.log_A_real) + 1j * k.A_imag
    dtA = torch.exp(k.log_dt)[:, None] * A
    CB = torch.view_as_complex(k.C) * (torch.exp(dtA) - 1) / A
    return 2 * torch.einsum("chm,hml->chl", CB, torch.exp(dtA[..., None] * torch.arange(n))).real


# n = 16: T = 8 divides it; 37 and 150: the last block runs past n (T = 14, 26); 1: one block of T = 2
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [1, 16, 37, 150])
def test_the_blocked_kernel_and_its_gradients_are_the_formulas(causal, n):
    m, _, _ = make_op("ssm", "s4d", d=D, causal=causal, N=10)
    perturb_params(m)
    k = m.kernel
    g = torch.randn(k.channels, D, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    params = [k.log_dt, k.log_A_real, k.A_imag, k.C]
    got, want = k(n), dense_kernel(k, n)
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()
    for a, b in zip(torch.autograd.grad((got * g).sum(), params), torch.autograd.grad((want * g).sum(), params)):
        assert (a - b).abs().max().item() <= 1e-10 * b.abs().max().item()


@pytest.mark.parametrize("m_new", [1, 9, 40])
def test_the_state_steps_are_the_recurrence(m_new):
    """from_state: 2 Re(C~ dA^(l+1) h) for l < m; advance: h <- dA h + u_t token by token (blocks of the lags)."""
    m, _, _ = make_op("ssm", "s4d", d=D, causal=True, N=8)
    perturb_params(m)
    dA, CB = modes(m)
    gen = torch.Generator().manual_seed(m_new)
    h = torch.complex(torch.randn(2, D, 4, dtype=torch.float64, generator=gen),
                      torch.randn(2, D, 4, dtype=torch.float64, generator=gen))
    u = torch.randn(2, D, m_new, dtype=torch.float64, generator=gen)
    want_y, want_h = torch.zeros(2, D, m_new, dtype=torch.float64), h
    for t in range(m_new):
        want_y[:, :, t] = 2 * (CB[0] * dA ** (t + 1) * h).sum(-1).real
        want_h = dA * want_h + u[:, :, t, None]
    with torch.no_grad():
        y, new = m.kernel.from_state(h, m_new), m.kernel.advance(h, u)
    assert (y - want_y).abs().max().item() <= 1e-10 * want_y.abs().max().item()
    assert (new - want_h).abs().max().item() <= 1e-10 * want_h.abs().max().item()


def test_the_kernel_keeps_nothing_of_the_length_times_the_modes():
    """At n = 4096 (blocks of T = 128 lags), no tensor autograd keeps holds n M / 8 elements, and the kernel's
    saved bytes are what _s4d_cost.py declares."""
    from evodsl.ops.cost import Symbols
    from evodsl.ops.ssm._s4d_cost import s4d_kernel_cost
    from evodsl.passes.cost import _num

    m, _, env = make_op("ssm", "s4d", d=4, causal=False, N=32, dtype=torch.float32)
    sizes = {}

    def pack(t):
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m.kernel(4096)
    kept = {p: b for p, b in sizes.items() if p not in {q.untyped_storage().data_ptr() for q in m.parameters()}}
    assert max(kept.values()) < 4 * 16 * 4096 // 8 * 4
    s = Symbols(4, 4)
    assert sum(kept.values()) == _num(s4d_kernel_cost(4, 16, 2, s)[0].saved, s.values, 1, 4096)


def test_float32_blocks_are_as_precise_as_the_one_shot_product(monkeypatch):
    """At n = 64k in float32, against float64: the blocked kernel's error is no larger than the one-shot product's
    (one block of n lags, as an export runs it)."""
    from evodsl.ops.ssm import _s4d_kernel

    m, _, _ = make_op("ssm", "s4d", d=2, causal=True, dtype=torch.float32)
    n = 65536
    with torch.no_grad():
        want = dense_kernel(m.kernel.double(), n)
        m.kernel.float()
        blocked = m.kernel(n).double()
        monkeypatch.setattr(_s4d_kernel, "block_of", lambda n: None)
        one_shot = m.kernel(n).double()
    scale = want.abs().amax(-1, keepdim=True)
    err_blocked, err_one = ((blocked - want).abs() / scale).max().item(), ((one_shot - want).abs() / scale).max().item()
    assert err_blocked <= 1e-4 and err_blocked <= 1.5 * err_one, (err_blocked, err_one)


def test_the_default_init_is_s4d_lin():
    m, _, _ = make_op("ssm", "s4d", d=D, causal=True, dtype=torch.float32)
    k = m.kernel
    assert torch.allclose(k.log_A_real.exp(), torch.full((D, 32), 0.5))
    assert torch.allclose(k.A_imag[3], torch.pi * torch.arange(32.0))
    dt = k.log_dt.exp()
    assert dt.min() >= 1e-3 - 1e-7 and dt.max() <= 0.1 + 1e-6


@pytest.mark.parametrize("args", [{"N": 8}, {"N": 2, "glu": False}])
def test_causal_does_not_leak_and_decodes_with_a_constant_state(args):
    from costhelpers import declared

    m, _, _ = make_op("ssm", "s4d", d=D, causal=True, **args)
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
            _, _, cost, ev = declared("ssm", "s4d", 2, t, dtype=torch.float64, d=D, causal=True, **args)
            assert state.nbytes() == ev(cost.cache) == 2 * D * args["N"] * 8


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_enters_neither_state_nor_convolution(side):
    m, _, _ = make_op("ssm", "s4d", d=D, causal=True, N=4)
    perturb_params(m)
    assert_padded_row_alone(m, side, d=D)


def test_validation():
    base = "vocab = 50\nd_model = 32\nmodel m(causal={c}) = input(tokens) -> embed(token) -> norm -> ssm(s4d{a}) -> norm -> head(lm)\n"
    evodsl.parse(base.format(c="true", a=", N=8"))
    evodsl.parse(base.format(c="false", a=", glu=false"))
    with pytest.raises(EvoError, match="conjugate pairs"):
        evodsl.parse(base.format(c="true", a=", N=7"))
    for bad in ("N=0", "N=2000", "glu=3"):
        with pytest.raises(EvoError, match=bad.split("=")[0]):
            evodsl.parse(base.format(c="true", a=", " + bad))


@pytest.mark.slow  # ~15 s: an export (test_onnx.py exports the causal forms in the default run)
def test_the_two_sided_kernels_export_with_a_symbolic_length(tmp_path):
    """The bidirectional forms (a two-sided kernel of 2n taps, no slice at n) of s4d, long and sgconv, chained in one
    file: onnxruntime against torch at n = 7, 33, 70, padded rows included."""
    from ophelpers import spec_onnx_parity

    src = ("d_model = 32\nmodel m(causal=false) = input(features, d=32) -> residual(ssm(s4d, N=8)) -> "
           "residual(longconv(long, max_len=128)) -> residual(longconv(sgconv, max_len=40, kernel_dim=4)) -> "
           "head(linear, d_out=8)\n")
    assert spec_onnx_parity(src, tmp_path) <= 1e-4
