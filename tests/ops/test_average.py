"""mixer(average), the Average Attention Network, against the paper's equations in float64: g_j = FFN((1/j) sum_{k<=j}
y_k), i_j, f_j = sigmoid(W [y_j; g_j] + b), h~_j = i_j y_j + f_j g_j, written position by position from the weights
(W as the one [2d -> 2d] map of the paper, assembled from W_y and W_g); causal, the bidirectional mean, without the
FFN, d_ff set; padding either side; decoding across chunks equals the forward; no leak. Decoding in models:
tests/test_decode.py."""
from __future__ import annotations

import pytest
import torch

from evodsl import EvoError, parse
from evodsl.ops import Ctx
from evodsl.decode import DecodeState
from ophelpers import assert_no_leak, make_op, perturb_params

D = 16


def reference(m, y, causal):
    b, n, d = y.shape
    W = torch.cat((m.gate_y.weight, m.gate_g.weight), 1)  # [2d, 2d] over [y; g]
    bias = m.gate_y.bias if m.gate_y.bias is not None else 0
    out = torch.zeros_like(y)
    for j in range(n):
        avg = y[:, :j + 1].sum(1) / (j + 1) if causal else y.mean(1)
        if m.ffn is not None:
            l1, l2 = m.ffn[0], m.ffn[2]
            hid = torch.relu(avg @ l1.weight.T + (0 if l1.bias is None else l1.bias))
            g = hid @ l2.weight.T + (0 if l2.bias is None else l2.bias)
        else:
            g = avg
        gates = torch.sigmoid(torch.cat((y[:, j], g), -1) @ W.T + bias)
        out[:, j] = gates[:, :d] * y[:, j] + gates[:, d:] * g
    return out


CASES = [(True, 1, {}), (True, 9, {}), (False, 9, {}), (True, 13, {"d_ff": 8, "bias": False}), (False, 5, {"ffn": False}),
         (True, 6, {"ffn": False})]


@pytest.mark.parametrize("causal, n, build", CASES)
def test_average_matches_equation(causal, n, build):
    m, _, _ = make_op("mixer", "average", d=D, causal=causal, **build)
    perturb_params(m)
    y = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        out, ref = m(y, Ctx()), reference(m, y, causal)
        assert (out - ref).abs().max().item() < 1e-12 * max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_gives_each_sequence_alone(causal, side):
    m, _, _ = make_op("mixer", "average", d=D, causal=causal)
    perturb_params(m)
    lengths, n = [12, 7, 1], 12
    x = torch.randn(3, n, D, dtype=torch.float64)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    mask = mask.flip(1) if side == "left" else mask
    x[~mask] = torch.randn(int((~mask).sum()), D, dtype=torch.float64) * 5
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        for i in range(3):
            alone = m(x[i:i + 1, mask[i]], Ctx())
            assert (y[i, mask[i]] - alone[0]).abs().max().item() < 1e-12
        if not causal or side == "left":  # the control: unmasked, padding reaches the shorter rows
            assert (m(x, Ctx())[1, mask[1]] - y[1, mask[1]]).abs().max().item() > 1e-6


def test_decoding_in_pieces_equals_the_forward():
    m, _, _ = make_op("mixer", "average", d=D, causal=True)
    perturb_params(m)
    x = torch.randn(2, 11, D, dtype=torch.float64)
    with torch.no_grad():
        full = m(x, Ctx())
        state, pieces, at = DecodeState(), [], 0
        for k in (4, 1, 3, 3):
            ctx = Ctx(cache=state, offset=at)
            pieces.append(m(x[:, at:at + k], ctx))
            at += k
        assert (torch.cat(pieces, 1) - full).abs().max().item() < 1e-12
        assert state.nbytes() == 2 * D * 8  # the running sum [b, 1, d]; the count is a number


def test_causal_does_not_leak_and_bidirectional_does():
    m, _, _ = make_op("mixer", "average", d=D, causal=True)
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=20, d=D)
    m, _, _ = make_op("mixer", "average", d=D, causal=False)
    with torch.no_grad(), pytest.raises(AssertionError, match="changed by"):
        assert_no_leak(lambda x: m(x, Ctx()), n=8, d=D)


def test_refusals():
    with pytest.raises(EvoError, match="d_ff"):
        parse("model m = input(features, d=32) -> mixer(average, d_ff=0)")
    with pytest.raises(EvoError, match="heads"):
        parse("model m = input(features, d=32) -> mixer(average, heads=4)")
