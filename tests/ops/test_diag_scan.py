"""The shared diagonal scan (evodsl/ops/rnn/_diag_scan.py) against the token loop h_t = a_t h_{t-1} + x_t written
here with torch's complex numbers, in float64: the chunked doubling at several n and chunk sizes (n not a
multiple, n below a chunk, one token a chunk), real and complex, time-invariant and gated decays, from a carried
state; its backward (the reverse recurrence) against autograd through the loop; the export form and the step."""
from __future__ import annotations

import pytest
import torch

from evodsl.ops import Ctx
from evodsl.ops.rnn._diag_scan import diag_scan, diag_step, exported_scan
from ophelpers import make_op


def loop(a, x, h0=None):
    h = torch.zeros_like(x[:, 0]) if h0 is None else h0
    out = []
    for t in range(x.shape[1]):
        h = (a if a.dim() == 1 else a[:, t]) * h + x[:, t]
        out.append(h)
    return torch.stack(out, 1)


def draw(b, n, D, complex_, gated, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (b, n, D) if gated else (D,)
    r = torch.rand(shape, generator=g, dtype=torch.float64) * 0.3 + 0.7
    x = torch.randn(b, n, D, generator=g, dtype=torch.float64)
    if not complex_:
        return r, None, x, None
    th = torch.rand(shape, generator=g, dtype=torch.float64) * 6
    return r * th.cos(), r * th.sin(), x, torch.randn(b, n, D, generator=g, dtype=torch.float64)


def join(re, im):
    return re if im is None else torch.complex(re, im)


def close(got, want, tol=1e-10):
    assert (got - want).abs().max().item() <= tol * max(want.abs().max().item(), 1.0)


@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("gated", [False, True], ids=["fixed", "gated"])
@pytest.mark.parametrize("n,chunk", [(1, 4), (5, 8), (37, 8), (37, 1), (64, 16), (45, 7)])
def test_scan_equals_the_token_loop(complex_, gated, n, chunk):
    ar, ai, xr, xi = draw(2, n, 3, complex_, gated, n)
    want = loop(join(ar, ai), join(xr, xi))
    hr, hi = diag_scan(ar, ai, xr, xi, chunk=chunk)
    close(join(hr, hi), want)
    er, ei = exported_scan(ar, ai, xr, xi)
    close(join(er, ei), want)


@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("gated", [False, True], ids=["fixed", "gated"])
def test_backward_is_the_reverse_recurrence(complex_, gated):
    """Gradients wrt a, x and h0 equal autograd's through the token loop (a real loss of both parts)."""
    ar, ai, xr, xi = draw(2, 23, 3, complex_, gated, 5)
    g = torch.Generator().manual_seed(9)
    h0 = tuple(None if t is None else torch.randn(2, 3, generator=g, dtype=torch.float64) for t in (xr, xi))
    w = [torch.randn(2, 23, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    leaves = [t.requires_grad_() for t in (ar, ai, xr, xi, *h0) if t is not None]

    def loss(hr, hi):
        return (hr * w[0]).sum() + (0 if hi is None else (hi * w[1]).sum())

    got = torch.autograd.grad(loss(*diag_scan(ar, ai, xr, xi, h0=h0, chunk=4)), leaves)
    h = loop(join(ar, ai), join(xr, xi), join(*h0))
    want = torch.autograd.grad(loss(h.real, h.imag) if complex_ else loss(h, None), leaves)
    for a, b in zip(got, want):
        close(a, b)


@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
def test_pieces_and_steps_carry_the_state(complex_):
    """A prefix scanned, the rest from its last state (in pieces, and token by token with diag_step)."""
    ar, ai, xr, xi = draw(2, 30, 4, complex_, True, 3)
    want = loop(join(ar, ai), join(xr, xi))
    hr, hi = diag_scan(ar[:, :11], None if ai is None else ai[:, :11], xr[:, :11], None if xi is None else xi[:, :11], chunk=4)
    h = (hr[:, -1], None if hi is None else hi[:, -1])
    r2, i2 = diag_scan(ar[:, 11:20], None if ai is None else ai[:, 11:20], xr[:, 11:20], None if xi is None else xi[:, 11:20],
                       h0=h, chunk=3)
    close(join(r2, i2), want[:, 11:20])
    h = (r2[:, -1], None if i2 is None else i2[:, -1])
    for t in range(20, 30):
        h = diag_step(ar[:, t], None if ai is None else ai[:, t], xr[:, t], None if xi is None else xi[:, t], h)
        close(join(*h), want[:, t])


@pytest.mark.parametrize("family,variant,args", [("ssm", "lru", {}), ("ssm", "s5", {}), ("rnn", "qrnn", {}), ("rnn", "gilr", {}), ("rnn", "gilr", {"lstm": True}),
                                                 ("rnn", "sru", {"scan": True, "attention": True})])
def test_runs_under_bfloat16_autocast(family, variant, args):
    """Autocast's bfloat16 inputs meet float32 decays; a complex scan runs in float32 (there is no complex bfloat16)."""
    m, _, _ = make_op(family, variant, d=16, causal=True, dtype=torch.float32, **args)
    x = torch.randn(2, 20, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x, Ctx())
    y.float().square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
