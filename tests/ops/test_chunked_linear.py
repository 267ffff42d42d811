"""The chunked kernels of the linear recurrences (evodsl/ops/attention/_chunked_linear.py, _chunked_delta.py) against
their token recurrences, in float64, to 1e-10: scalar and vector decay (retention, GLA), the delta rule with and
without its gate (DeltaNet, Gated DeltaNet), at lengths below, at and past a chunk and not a multiple of it, from a
zero and from a given state (decoding continues one). The recurrences here are written from the equations, apart
from the kernels' own step forms, which are checked too."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evodsl.ops.attention._chunked_delta import chunked_delta, recurrent_delta
from evodsl.ops.attention._chunked_linear import chunked_decay, factorisable, recurrent_decay

B, H, DK, DV = 2, 3, 5, 4


def decay_reference(q, k, v, g, s):
    """S_t = diag(exp g_t) S_(t-1) + k_t v_t^T, o_t = q_t^T S_t, one token and one head at a time."""
    s, out = s.clone(), torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    for bb in range(q.shape[0]):
        for hh in range(q.shape[1]):
            for t in range(q.shape[2]):
                a = g[bb, hh, t].exp() * torch.ones(q.shape[-1], dtype=q.dtype)
                s[bb, hh] = torch.diag(a) @ s[bb, hh] + torch.outer(k[bb, hh, t], v[bb, hh, t])
                out[bb, hh, t] = q[bb, hh, t] @ s[bb, hh]
    return out, s


def delta_reference(q, k, v, beta, g, s):
    """S_t = a_t (I - beta_t k_t k_t^T) S_(t-1) + beta_t k_t v_t^T, o_t = q_t^T S_t."""
    s, out = s.clone(), torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    for bb in range(q.shape[0]):
        for hh in range(q.shape[1]):
            for t in range(q.shape[2]):
                kt, bt = k[bb, hh, t], beta[bb, hh, t]
                a = 1.0 if g is None else g[bb, hh, t].exp()
                s[bb, hh] = a * (eye - bt * torch.outer(kt, kt)) @ s[bb, hh] + bt * torch.outer(kt, v[bb, hh, t])
                out[bb, hh, t] = q[bb, hh, t] @ s[bb, hh]
    return out, s


def inputs(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    u = lambda *shape: torch.rand(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    return r(B, H, n, DK), r(B, H, n, DK), r(B, H, n, DV), r(B, H, DK, DV), u, r


@pytest.mark.parametrize("n,chunk", [(1, 4), (5, 16), (16, 16), (37, 16), (37, 8), (70, 64), (23, 5)])
@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
@pytest.mark.parametrize("start", [False, True], ids=["zero", "state"])
def test_chunked_decay_is_the_recurrence(n, chunk, vector, start):
    q, k, v, s0, u, _ = inputs(n)
    g = -0.5 * u(B, H, n, *((DK,) if vector else ()))
    s0 = s0 if start else torch.zeros_like(s0)
    want, state = decay_reference(q, k, v, g, s0)
    for o, s in (chunked_decay(q, k, v, g, s0 if start else None, chunk), recurrent_decay(q, k, v, g, s0)):
        assert (o - want).abs().max() < 1e-10 and (s - state).abs().max() < 1e-10


@pytest.mark.parametrize("n,chunk", [(1, 4), (5, 16), (16, 16), (37, 16), (37, 8), (70, 64), (23, 5)])
@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
@pytest.mark.parametrize("start", [False, True], ids=["zero", "state"])
def test_chunked_delta_is_the_recurrence(n, chunk, gated, start):
    q, k, v, s0, u, _ = inputs(n, seed=1)
    k = F.normalize(k, dim=-1)
    beta, g = u(B, H, n), (-0.5 * u(B, H, n) if gated else None)
    s0 = s0 if start else torch.zeros_like(s0)
    want, state = delta_reference(q, k, v, beta, g, s0)
    for o, s in (chunked_delta(q, k, v, beta, g, s0 if start else None, chunk), recurrent_delta(q, k, v, beta, g, s0)):
        assert (o - want).abs().max() < 1e-10 and (s - state).abs().max() < 1e-10


def test_chunks_continue_each_other():
    """Two calls, the second from the first's state, equal one call over both pieces (prefill then decode)."""
    q, k, v, _, u, _ = inputs(40, seed=2)
    g, beta = -0.3 * u(B, H, 40, DK), u(B, H, 40)
    whole, _ = chunked_decay(q, k, v, g, chunk=16)
    first, s = chunked_decay(q[:, :, :25], k[:, :, :25], v[:, :, :25], g[:, :, :25], chunk=16)
    rest, _ = chunked_decay(q[:, :, 25:], k[:, :, 25:], v[:, :, 25:], g[:, :, 25:], s, chunk=16)
    assert (torch.cat((first, rest), 2) - whole).abs().max() < 1e-10
    k = F.normalize(k, dim=-1)
    whole, _ = chunked_delta(q, k, v, beta, g[..., 0], chunk=16)
    first, s = chunked_delta(q[:, :, :25], k[:, :, :25], v[:, :, :25], beta[:, :, :25], g[:, :, :25, 0], chunk=16)
    rest, _ = chunked_delta(q[:, :, 25:], k[:, :, 25:], v[:, :, 25:], beta[:, :, 25:], g[:, :, 25:, 0], s, chunk=16)
    assert (torch.cat((first, rest), 2) - whole).abs().max() < 1e-10


@pytest.mark.parametrize("dtype,rate", [(torch.float64, 150.0), (torch.float32, 20.0)], ids=["float64", "float32"])
def test_vector_decay_past_the_float_range(dtype, rate):
    """A chunk whose decay passes exp(-0.8 ln(max float)) (a gate that forgets at once; GLA's logsigmoid / 16 of a
    large negative activation, RWKV-6's exp(-e^w)) leaves the factorisation q_i exp(B_i) . k_j exp(-B_j) for the
    ratios exp(B_i - B_j) <= 1: the outputs, the state and every gradient stay the recurrence's, against the
    reference in float64 (1e-10 relative in float64, 1e-5 in float32; at these rates the factorised form gives nan
    in both)."""
    q, k, v, s0, u, _ = inputs(37, seed=3)
    g = -rate * u(B, H, 37, DK)
    assert not factorisable(g[:, :, :16].to(dtype).sum(2))  # the chunks of 16 do pass it
    want, state = decay_reference(q, k, v, g, s0)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    args = [t.to(dtype).requires_grad_() for t in (q, k, v, g, s0)]
    o, s = chunked_decay(*args[:4], args[4], 16)
    assert (o.double() - want).abs().max() <= tol * want.abs().max()
    assert (s.double() - state).abs().max() <= tol * state.abs().max()
    if dtype == torch.float64:  # the gradients against autograd through the recurrence
        w = torch.randn(o.shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
        got = torch.autograd.grad((o * w).sum() + s.sum(), args)
        ref = [t.detach().requires_grad_() for t in args]
        ro, rs = recurrent_decay(*ref[:4], ref[4])
        for a, b in zip(got, torch.autograd.grad((ro * w).sum() + rs.sum(), ref)):
            assert (a - b).abs().max() <= 1e-10 * b.abs().max()


def test_vector_decay_compiles_whole():
    """torch.compile(fullgraph=True) takes the vector-decay kernel with no branch on the data (compiled, it always
    takes the ratios): the same outputs and state, with a decay past the float range."""
    q, k, v, s0, u, _ = inputs(37, seed=5)
    g = -150.0 * u(B, H, 37, DK)
    want = chunked_decay(q, k, v, g, s0, 16)
    got = torch.compile(chunked_decay, backend="eager", fullgraph=True)(q, k, v, g, s0, 16)
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-12 * b.abs().max()
