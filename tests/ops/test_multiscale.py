"""mha(multiscale) (the retina model, our reading) against its defining walk, in float64: for each query t, the
slots are listed by walking outward from t in Python integers (scale s < S: from the boundary b, blocks of k^s
down to max(0, k^(s+1) floor((b - w k^s) / k^(s+1))); then every block of k^S left; bidirectional: the mirrored
walk after t with ceilings), each slot the mean key and value of its real tokens, one softmax over them. A window
as long as the sequence is softmax attention; right padding equals the sequence alone (test_padding.py), left is
refused; decoding equals the forward (test_decode.py), the causal form does not leak (test_leaks.py)."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_no_leak, head_projections, make_op, output_projection, perturb_params

D = 32


def walk(t: int, n: int, w: int, k: int, S: int, causal: bool) -> list[tuple[int, int]]:
    """The token ranges [lo, hi) query t reads, one per slot (its own token first)."""
    out, b = [], t + 1
    for s in range(S):
        P, Q = k ** s, k ** (s + 1)
        nb = max(0, Q * ((b - w * P) // Q))
        out += [(c * P, (c + 1) * P) for c in range(b // P - 1, nb // P - 1, -1)]
        b = nb
    P = k ** S
    out += [(c * P, (c + 1) * P) for c in range(b // P)]
    if not causal:
        e = t + 1
        for s in range(S):
            P, Q = k ** s, k ** (s + 1)
            ne = Q * -(-(e + w * P) // Q)
            out += [(c * P, min(n, (c + 1) * P)) for c in range(e // P, ne // P) if c * P < n]
            e = ne
        P = k ** S
        out += [(c * P, min(n, (c + 1) * P)) for c in range(e // P, -(-n // P))]
    return out


def reference(m, x, w, k, S, causal, mask=None):
    q, kk, v = head_projections(m, x)  # [b, n, h, dh], [b, n, kv, dh]
    b, n, h, dh = q.shape
    g = h // kk.shape[2]
    real = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        for t in range(n):
            if not real[bb, t]:
                continue
            ks, vs = [], []
            for lo, hi in walk(t, n, w, k, S, causal):
                idx = [i for i in range(lo, hi) if real[bb, i]]
                if idx:
                    ks.append(kk[bb, idx].mean(0))
                    vs.append(v[bb, idx].mean(0))
            ks, vs = torch.stack(ks), torch.stack(vs)  # [slots, kv, dh]
            for hh in range(h):
                wgt = (ks[:, hh // g] @ q[bb, t, hh] / math.sqrt(dh)).softmax(0)
                out[bb, t, hh] = wgt @ vs[:, hh // g]
    return output_projection(m, out.reshape(b, n, h * dh))


def test_the_walk_reads_every_position_once():
    for causal in (True, False):
        for n, w, k, S in ((40, 2, 2, 3), (37, 3, 3, 2), (50, 1, 2, 4), (9, 8, 2, 2)):
            for t in range(n):
                seen = sorted(i for lo, hi in walk(t, n, w, k, S, causal) for i in range(lo, min(hi, n)))
                assert seen == list(range(t + 1 if causal else n)), (causal, n, t)


CASES = [  # causal, window, pool, scales, n, kv_heads
    (True, 2, 2, 2, 30, None), (False, 2, 2, 2, 30, None),
    (True, 3, 3, 2, 41, 2), (False, 3, 3, 2, 41, 2),  # blocks of 3 and 9; no multiple of either
    (True, 1, 2, 4, 37, 1), (False, 2, 2, 3, 37, 1),  # four scales: blocks of 2, 4, 8, 16
    (True, 4, 2, 1, 23, 2), (False, 4, 2, 1, 23, None),  # one scale: the window, then blocks of 2
    (True, 8, 4, 2, 5, None), (False, 8, 4, 2, 5, 2),  # n < w: the tokens alone
]


@pytest.mark.parametrize("causal, w, k, S, n, kv_heads", CASES)
def test_multiscale_matches_equation(causal, w, k, S, n, kv_heads):
    m, _, _ = make_op("mha", "multiscale", d=D, causal=causal, heads=4, kv_heads=kv_heads, window=w, pool=k, scales=S)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference(m, x, w, k, S, causal)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        if n > w + k:  # the pooled slots are seen: not softmax attention
            s, _, _ = make_op("mha", "softmax", d=D, causal=causal, heads=4, kv_heads=kv_heads)
            s.load_state_dict(m.state_dict())
            assert (y - s(x, Ctx())).abs().max().item() > 1e-6


@pytest.mark.parametrize("causal", [False, True])
def test_a_window_as_long_as_the_sequence_is_softmax_attention(causal):
    m, _, _ = make_op("mha", "multiscale", d=D, causal=causal, heads=4, kv_heads=2, window=30, pool=2, scales=2)
    s, _, _ = make_op("mha", "softmax", d=D, causal=causal, heads=4, kv_heads=2)
    perturb_params(m)
    s.load_state_dict(m.state_dict())
    x = torch.randn(2, 30, D, dtype=torch.float64)
    with torch.no_grad():
        assert (m(x, Ctx()) - s(x, Ctx())).abs().max().item() < 1e-12


def test_right_padding_matches_equation_over_the_tokens():
    m, _, _ = make_op("mha", "multiscale", d=D, heads=4, kv_heads=2, window=2, pool=2, scales=2)
    perturb_params(m)
    x = torch.randn(2, 27, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mask = torch.arange(27)[None, :] < torch.tensor([[27], [19]])
    with torch.no_grad():
        y, ref = m(x, Ctx(mask=mask)), reference(m, x, 2, 2, 2, False, mask)
        assert (y - ref)[mask].abs().max().item() < 1e-10


def test_causal_does_not_leak_and_bidirectional_does():
    m, _, _ = make_op("mha", "multiscale", d=D, causal=True, heads=4, kv_heads=2, window=2, pool=2, scales=3)
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=37, d=D)
    m, _, _ = make_op("mha", "multiscale", d=D, causal=False, heads=4, window=2)
    with torch.no_grad(), pytest.raises(AssertionError, match="changed by"):
        assert_no_leak(lambda x: m(x, Ctx()), n=12, d=D)


@pytest.mark.parametrize("causal", [False, True])
def test_left_padding_is_refused(causal):
    m, _, _ = make_op("mha", "multiscale", d=D, causal=causal, heads=4, window=2)
    x = torch.randn(2, 10, D, dtype=torch.float64)
    left = torch.ones(2, 10, dtype=torch.bool)
    left[0, :3] = False
    with pytest.raises(EvoError, match="E409.*right padding"):
        m(x, Ctx(mask=left))


@pytest.mark.parametrize("args, message", [("window=0", "window"), ("pool=1", "pool"), ("scales=0", "scales"),
                                           ("dropout=0.1", "no dropout")])
def test_bad_params_are_refused(args, message):
    with pytest.raises(EvoError, match=message):
        evodsl.parse(f"model m(causal=true) = input(features, d=32) -> mha(multiscale, {args}, heads=4) "
                     f"-> head(linear, d_out=2)")
