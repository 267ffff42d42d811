"""rnn(rfwp) against the Recurrent Delta Net (arXiv:2106.06295 eq. 13-18), in float64: per head and token, the slow
net's q, k = softmax(x W + tanh(y_(t-1)) R), v = x W_V + tanh(y_(t-1)) R_v, beta = sigmoid(x W_beta + tanh(y_(t-1))
r_b), then W <- W + beta (v - W k) k^T, y = W q, written as a loop over batch, heads and tokens with the paper's W
(values by keys) apart from the module's core; then W_O. Decoding a token at a time and in pieces equals the forward; padding is skipped; bad arguments are refused with EvoErrors."""
from __future__ import annotations

import pytest
import torch

from ophelpers import (assert_every_parameter_learns, assert_padded_row_alone, assert_steps_and_pieces_agree, make_op,
                       perturb_params)

D = 32


def reference(m, x):
    b, n, _ = x.shape
    H, dh = m.heads, m.dh
    z = x @ m.in_proj.weight.T + (0 if m.in_proj.bias is None else m.in_proj.bias)
    xq, xk, xv = (z[..., i * H * dh:(i + 1) * H * dh].reshape(b, n, H, dh) for i in range(3))
    xb = z[..., 3 * H * dh:]
    out = torch.zeros(b, n, H, dh, dtype=x.dtype)
    for bb in range(b):
        for hh in range(H):
            W, y = torch.zeros(dh, dh, dtype=x.dtype), torch.zeros(dh, dtype=x.dtype)
            for t in range(n):
                h = torch.tanh(y)
                Rq, Rk, Rv, rb = m.R[hh, :, :dh], m.R[hh, :, dh:2 * dh], m.R[hh, :, 2 * dh:3 * dh], m.R[hh, :, 3 * dh]
                q = torch.softmax(xq[bb, t, hh] + h @ Rq, 0)
                k = torch.softmax(xk[bb, t, hh] + h @ Rk, 0)
                v = xv[bb, t, hh] + h @ Rv
                beta = torch.sigmoid(xb[bb, t, hh] + h @ rb)
                W = W + beta * torch.outer(v - W @ k, k)
                y = W @ q
                out[bb, t, hh] = y
    o = out.reshape(b, n, H * dh)
    return o @ m.o_proj.weight.T + (0 if m.o_proj.bias is None else m.o_proj.bias)


CASES = [(5, {"heads": 4}), (23, {"heads": 2}), (17, {"heads": 4, "head_dim": 6, "bias": False}), (1, {"heads": 8})]


@pytest.mark.parametrize("n,build", CASES)
def test_rfwp_is_the_recurrence(n, build):
    m, _, _ = make_op("rnn", "rfwp", d=D, causal=True, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    want = reference(m, x)
    assert (m(x, None) - want).abs().max() < 1e-10 * want.abs().max()


@pytest.mark.parametrize("n,build", CASES[1:3])
def test_forms_agree(n, build):
    """The training loop, a token at a time through the decoding state (W, y), and a prompt then pieces: equal to
    1e-10 (the export's scan: tests/test_onnx.py, against this forward)."""
    m, _, _ = make_op("rnn", "rfwp", d=D, causal=True, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = m(x, None)
    assert_steps_and_pieces_agree(m, x, y)


def test_padding_and_learning():
    m, _, _ = make_op("rnn", "rfwp", d=D, causal=True, heads=4)
    perturb_params(m, scale=0.3)
    assert_padded_row_alone(m, "left")
    assert_padded_row_alone(m, "right")
    assert_every_parameter_learns(m, n=12)


def test_decoding_state_is_constant():
    """The fast weights (dh x dh) and the last output (dh) of every head: the cost's kv_cache, the same after 5
    tokens and after 30."""
    from costhelpers import declared
    from evodsl.decode import DecodeState
    from evodsl.ops import Ctx

    m, _, cost, ev = declared("rnn", "rfwp", 2, 5, d=D, causal=True, heads=4)
    state, x, sizes = DecodeState(), torch.randn(2, 30, D), {}
    for at in range(30):
        m(x[:, at:at + 1], Ctx(cache=state, offset=at))
        sizes[at + 1] = state.nbytes()
    assert sizes[5] == sizes[30] == ev(cost.cache) == 2 * 4 * (8 * 8 + 8) * 4  # float32


def test_refusals():
    import evodsl

    def build(args, causal="true"):
        evodsl.parse(f"model m(causal={causal}) = input(features, d=32) -> rnn(rfwp, {args}) -> head(linear, d_out=2)")

    build("heads=4")
    for args, causal, pattern in [("heads=5", "true", "divisible"), ("heads=0", "true", "heads"),
                                  ("heads=4", "false", "causal only"), ("heads=4, head_dim=0", "true", "head_dim")]:
        with pytest.raises(evodsl.EvoError, match=pattern):
            build(args, causal)
