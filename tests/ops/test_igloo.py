"""mixer(igloo) against its defining equation, in float64, written here position by position: the convolution tap
by tap (causal: the k - 1 positions before; else centred, zero past the ends), LeakyReLU(0.1), C = H W_c, each patch's
sum over its L drawn positions of W_B[p, l] . C[j] (positions at or past n read zero), plus b_p, mixed by W_P, the P
drawn values of H W_v weighted, then W_o. The drawn tables are the module's (seeded), read here as data; their
draw is checked apart (near t, from the past when causal, t itself at the stated rate)."""
from __future__ import annotations

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from evodsl.ops.mixer.igloo import IglooParams, draw_patches
from ophelpers import assert_no_leak, decode_in_pieces, make_op, perturb_params

D = 24


def reference(m, x, causal):
    b, n, d = x.shape
    k = m.k
    W, bc = m.conv.weight, m.conv.bias  # [d_out, d_in, k]
    left = k - 1 if causal else (k - 1) // 2
    h = torch.zeros(b, n, d, dtype=x.dtype)
    for t in range(n):
        acc = torch.zeros(b, d, dtype=x.dtype) + (0 if bc is None else bc)
        for i in range(k):
            j = t - left + i
            if 0 <= j < n:
                acc = acc + x[:, j] @ W[:, :, i].T
        h[:, t] = torch.nn.functional.leaky_relu(acc, 0.1)
    C = h @ m.compress.weight.T
    V = h @ m.value.weight.T
    P, L = m.P, m.L
    wb = m.w_base.view(-1, P, L)  # [c, P, L]
    out = torch.zeros(b, n, d, dtype=x.dtype)
    for t in range(n):
        s = torch.zeros(b, P, dtype=x.dtype)
        for p in range(P):
            for l in range(L):
                j = int(m.pos[t, p, l])
                if j < n:
                    s[:, p] += C[:, j] @ wb[:, p, l]
        a = (s + m.p_bias) @ m.mix.weight.T
        o = torch.zeros(b, d, dtype=x.dtype)
        for p in range(P):
            j = int(m.vpos[t, p])
            if j < n:
                o = o + a[:, p, None] * V[:, j]
        out[:, t] = o @ m.out.weight.T + (0 if m.out.bias is None else m.out.bias)
    return out


CASES = [(False, 13, {}), (True, 13, {}), (False, 9, {"kernel": 4, "patches": 5, "patch": 3, "compress": 2}),
         (True, 17, {"kernel": 1, "patches": 3, "patch": 6, "spread": 1.5, "bias": False}), (True, 1, {}), (False, 2, {})]


@pytest.mark.parametrize("causal, n, args", CASES)
def test_igloo_matches_equation(causal, n, args):
    m, _, _ = make_op("mixer", "igloo", d=D, causal=causal, max_len=20, **args)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference(m, x, causal)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize("causal", [False, True])
def test_patches_are_drawn_near_t(causal):
    p = IglooParams(max_len=400, patches=16, patch=4, spread=3.0, seed=2)
    pos, vpos = draw_patches(p, causal)
    t = torch.arange(400)[:, None, None]
    off = pos - t
    assert off.abs().max() <= 9 and (pos >= 0).all() and (pos < 400).all()
    if causal:
        assert (off <= 0).all() and (vpos <= torch.arange(400)[:, None]).all()
    else:
        assert (off > 0).any()
    own = (pos[:, :, 0] == t[:, :, 0]).double().mean().item()
    assert 0.75 <= own <= 0.85  # 0.75 by rule, plus the draws that land on t
    assert (draw_patches(p, causal)[0] == pos).all()  # seeded


def test_causal_does_not_leak_and_decodes():
    m, _, _ = make_op("mixer", "igloo", d=D, causal=True, max_len=40, spread=2.0)
    perturb_params(m)
    x = torch.randn(2, 23, D, dtype=torch.float64)
    with torch.no_grad():
        assert_no_leak(lambda t: m(t, Ctx()), n=23, d=D)
        y, _ = decode_in_pieces(m, x, (5, 1, 3, 1, 13))
        assert (y - m(x, Ctx())).abs().max().item() < 1e-10


@pytest.mark.parametrize("args", [{"spread": 2.0}, {"spread": 1.0, "kernel": 1, "patches": 3, "patch": 6},
                                  {"spread": 4.0, "kernel": 5, "compress": 7, "bias": False}])
def test_decoding_state_is_what_the_taps_and_draws_reach(args):
    """The step form (_igloo_step.py) equals the forward piece by piece (single tokens, chunks, one prompt); its
    state is the declared kv_cache at every length, k - 1 inputs and R = ceil(3 sigma) positions' C and values,
    and stops growing there; past max_len it is refused."""
    from costhelpers import declared

    m, _, _ = make_op("mixer", "igloo", d=D, causal=True, max_len=40, **args)
    perturb_params(m)
    x = torch.randn(2, 40, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = m(x, Ctx())
        for sizes in ((5, 1, 3, 1, 30), (1,) * 40):
            y, _ = decode_in_pieces(m, x, sizes)
            assert (y - want).abs().max().item() < 1e-10 * want.abs().max().item()
        sizes = []
        for t in (1, 3, 40):
            _, state = decode_in_pieces(m, x[:, :t], (1,) * t)
            _, _, cost, ev = declared("mixer", "igloo", 2, t, dtype=torch.float64, d=D, causal=True, max_len=40, **args)
            assert state.nbytes() == ev(cost.cache)
            sizes.append(state.nbytes())
        assert sizes[-1] < 2 * 40 * D * 8  # less than the inputs of every position
        with pytest.raises(EvoError, match="E410.*max_len=40"):
            m(x[:, :1], Ctx(cache=state, offset=40))


@pytest.mark.parametrize("causal", [False, True])
def test_right_padding_equals_alone_and_left_is_refused(causal):
    m, _, _ = make_op("mixer", "igloo", d=D, causal=causal, max_len=20)
    perturb_params(m)
    x = torch.randn(2, 12, D, dtype=torch.float64)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        assert (y[1, :7] - m(x[1:, :7], Ctx())[0]).abs().max().item() < 1e-10
        left = mask.flip(1)
        with pytest.raises(EvoError, match="E409.*right padding"):
            m(x, Ctx(mask=left))


def test_validation():
    base = "d_model = 32\nmodel m = input(features, d=32) -> mixer(igloo, {}) -> head(linear, d_out=2)\n"
    with pytest.raises(EvoError, match="max_len"):
        evodsl.parse(base.format("patches=4"))
    for bad in ("patches=0", "patch=0", "spread=0", "own=1.5", "kernel=0"):
        with pytest.raises(EvoError, match=bad.split("=")[0]):
            evodsl.parse(base.format("max_len=64, " + bad))


def test_longer_than_max_len_is_refused():
    m, _, _ = make_op("mixer", "igloo", d=D, max_len=8)
    with pytest.raises(EvoError, match="E410.*max_len=8"):
        m(torch.randn(1, 9, D, dtype=torch.float64), Ctx())
