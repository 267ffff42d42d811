"""mha(momentum) against the paper's recurrence, computed here in float64 token by token (m_i, S_i, z_i); beta = 0,
gamma = 1 is mha(linear); decoding in pieces equals the forward; the chunked form at every chunk size."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from evodsl.ops import OpEnv, ShapeProblem, load_all, lookup
from ophelpers import assert_no_leak, decode_in_pieces, head_projections, make_op, output_projection, perturb_params

D = 32


def _x(b: int, n: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(b, n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def reference(m, x, beta, gamma, eps, causal):
    """The recurrence m_i = beta m_{i-1} - phi(k_i) v_i^T, S_i = S_{i-1} - gamma m_i, z_i = z_{i-1} + phi(k_i),
    o_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps), one token at a time; bidirectional, every query reads S_n, z_n."""
    q, k, v = head_projections(m, x)  # [b, n, H, dh]
    b, n, heads, dh = q.shape
    group = [hd * k.shape[2] // heads for hd in range(heads)]
    k, v = k[:, :, group], v[:, :, group]
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    mom = torch.zeros(b, heads, dh, dh, dtype=x.dtype)
    S = torch.zeros_like(mom)
    z = torch.zeros(b, heads, dh, dtype=x.dtype)
    states = []
    for i in range(n):
        mom = beta * mom - torch.einsum("bhd,bhe->bhde", fk[:, i], v[:, i])
        S = S - gamma * mom
        z = z + fk[:, i]
        states.append((S, z))
    o = torch.empty(b, n, heads, dh, dtype=x.dtype)
    for i in range(n):
        S, z = states[i] if causal else states[-1]
        num = torch.einsum("bhd,bhde->bhe", fq[:, i], S)
        o[:, i] = num / (torch.einsum("bhd,bhd->bh", fq[:, i], z)[..., None] + eps)
    return output_projection(m, o.reshape(b, n, heads * dh))


CASES = [  # (n, chunk, heads, kv_heads, beta, gamma)
    (100, 64, 4, 4, 0.6, 1.0),  # two chunks, a remainder
    (20, 64, 4, 4, 0.9, 0.5),  # one chunk
    (29, 8, 4, 2, 0.6, 1.0),  # four chunks (a doubling step past the first) and a remainder, grouped K/V heads
    (37, 4, 4, 1, 0.95, 2.0),  # ten chunks, multi-query
    (13, 4, 2, 2, 0.0, 1.0),  # beta = 0: linear attention
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("n,chunk,heads,kv_heads,beta,gamma", CASES)
def test_momentum_equation(causal, n, chunk, heads, kv_heads, beta, gamma):
    m, _, _ = make_op("mha", "momentum", d=D, causal=causal, heads=heads, kv_heads=kv_heads, beta=beta, gamma=gamma)
    m.chunk = chunk
    perturb_params(m)
    x = _x(2, n)
    ref = reference(m, x, beta, gamma, 1e-6, causal)
    torch.testing.assert_close(m(x, None), ref, rtol=1e-10, atol=1e-10)
    if causal:  # the export's per-position form
        q, k, v = m.qkv(x)
        fq, fk = F.elu(q) + 1, m.expand_kv(F.elu(k) + 1)
        o = m._prefix_sums(fq, fk, m.expand_kv(v)).div_(m._den(fq, fk))
        torch.testing.assert_close(m.out(o), ref, rtol=1e-10, atol=1e-10)


def test_beta_zero_is_linear_attention():
    m, _, _ = make_op("mha", "momentum", d=D, causal=True, heads=4, beta=0.0, gamma=1.0)
    lin, _, _ = make_op("mha", "linear", d=D, causal=True, heads=4)
    perturb_params(m)
    lin.load_state_dict(m.state_dict())
    x = _x(2, 70)
    torch.testing.assert_close(m(x, None), lin(x, None), rtol=1e-10, atol=1e-12)
    m.beta = 0.6  # and momentum changes it
    assert (m(x, None) - lin(x, None)).abs().max() > 1e-3


@pytest.mark.parametrize("chunk", [4, 64])
def test_decoding_in_pieces_equals_the_forward(chunk):
    m, _, _ = make_op("mha", "momentum", d=D, causal=True, heads=4, kv_heads=2, beta=0.8, gamma=0.7)
    m.chunk = chunk
    perturb_params(m)
    x = _x(2, 31)
    full = m(x, None)
    got, state = decode_in_pieces(m, x, (5, 1, 1, 7, 3, 1, 13))
    torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-12)
    assert [t.shape for t in state.caches[next(iter(state.caches))]] == [(2, 2, 8, 8), (2, 2, 8, 8), (2, 2, 1, 8)]


def test_causal_does_not_leak():
    m, _, _ = make_op("mha", "momentum", d=D, causal=True, heads=4, kv_heads=2)
    m.chunk = 8
    perturb_params(m)
    assert_no_leak(lambda x: m(x, None), n=29, d=D)


def test_params_and_shape_rule():
    load_all()
    op = lookup("mha", "momentum")
    assert op.causal == "yes" and op.supports == frozenset()
    for bad in ({"beta": 1.0}, {"beta": -0.1}, {"gamma": 0.0}, {"eps": -1.0}):
        with pytest.raises(ValidationError):
            op.params(**bad)
    with pytest.raises(ShapeProblem) as e:
        op.shape(op.params(dropout=0.1), OpEnv(in_shapes=(("b", "n", D),)))
    assert e.value.field == "dropout"
