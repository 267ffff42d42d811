"""mha(fixed) against its defining equation, in float64: each head's fixed map A written here as an explicit n x n
matrix from the pattern's definition (the keys of row i, uniform, restricted to j <= i and renormalised when causal,
padded keys dropped), out = o_proj([A_1 V_1 .. A_H V_H]), V from v_proj's weights; every pattern, causal and not,
grouped K/V heads, n below and above the window, padding on either side."""
from __future__ import annotations

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_no_leak, decode_in_pieces, make_op, output_projection, perturb_params

D = 32
ORDER = ("local", "prev", "next", "global", "vertical")


def keys_of(pat, i, real, causal, w, g):
    """The keys row i reads: real holds the positions of the sequence's tokens (i among them)."""
    r = real.index(i)
    if causal and pat == "next":
        pat = "diagonal"
    if pat == "diagonal":
        ks = [i]
    elif pat == "local":
        ks = [j for j in real if abs(real.index(j) - r) <= w]
    elif pat == "prev":
        ks = [real[r - 1]] if r > 0 else [i]
    elif pat == "next":
        ks = [real[r + 1]] if r + 1 < len(real) else [i]
    elif pat == "global":
        ks = list(real)
    else:  # vertical
        ks = real[:g]
    if causal:
        ks = [j for j in ks if j <= i]
    return ks


def reference(m, x, causal, pattern, w, g, mask=None):
    b, n, d = x.shape
    h, kv, dh = m.heads, m.kv_heads, m.head_dim
    v = (x @ m.v_proj.weight.T + (0 if m.v_proj.bias is None else m.v_proj.bias)).view(b, n, kv, dh)
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        real = [j for j in range(n) if mask is None or mask[bb, j]]
        for hh in range(h):
            pat = ORDER[hh % 5] if pattern == "mixed" else pattern
            A = torch.zeros(n, n, dtype=x.dtype)
            for i in real:
                ks = keys_of(pat, i, real, causal, w, g)
                A[i, ks] = 1.0 / len(ks)
            out[bb, :, hh] = A @ v[bb, :, hh // (h // kv)]
    return output_projection(m, out.reshape(b, n, h * dh))


PATTERNS = ("mixed", "diagonal", "local", "prev", "next", "global", "vertical")
CASES = [(p, c, n, kv) for p in PATTERNS for c in (False, True) for n, kv in ((13, None), (4, 2))] + [
    ("mixed", True, 1, 1), ("local", False, 1, None), ("vertical", True, 9, 5)]


@pytest.mark.parametrize("pattern, causal, n, kv_heads", CASES)
def test_fixed_matches_equation(pattern, causal, n, kv_heads):
    heads = 5 if kv_heads == 5 else 10 if pattern == "mixed" else 4
    w, g = 3, 3
    m, _, _ = make_op("mha", "fixed", d=40, causal=causal, heads=heads, kv_heads=kv_heads, pattern=pattern,
                      window=w, globals=g)
    perturb_params(m)
    x = torch.randn(2, n, 40, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference(m, x, causal, pattern, w, g)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_padding_either_side(pattern, causal):
    m, _, _ = make_op("mha", "fixed", d=40, causal=causal, heads=10, kv_heads=5, pattern=pattern, window=2, globals=2)
    perturb_params(m)
    x = torch.randn(2, 11, 40, dtype=torch.float64)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, 8:] = False
    mask[1, :4] = False
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        ref = reference(m, x, causal, pattern, 2, 2, mask)
        assert (((y - ref) * mask[..., None]).abs().max().item() < 1e-10)
        assert torch.isfinite(y).all()


def test_causal_does_not_leak_and_decodes():
    m, _, _ = make_op("mha", "fixed", d=40, causal=True, heads=10, kv_heads=5, pattern="mixed", window=3, globals=4)
    perturb_params(m)
    x = torch.randn(2, 23, 40, dtype=torch.float64)
    with torch.no_grad():
        assert_no_leak(lambda t: m(t, Ctx()), n=23, d=40)
        y, _ = decode_in_pieces(m, x, (5, 1, 3, 1, 13))
        assert (y - m(x, Ctx())).abs().max().item() < 1e-10


@pytest.mark.parametrize("pattern, build", [("local", {"window": 3}), ("local", {"window": 0}), ("prev", {}),
                                            ("next", {}), ("global", {"kv_heads": 2}), ("vertical", {"globals": 5}),
                                            ("diagonal", {}), ("mixed", {"window": 4, "globals": 2, "kv_heads": 5})])
def test_decoding_state_is_what_the_patterns_reach(pattern, build):
    """The step form (_fixed_step.py) equals the forward piece by piece, and its state is the declared kv_cache at
    every length: the last w values (prev: 1), a sum per global / vertical pattern; it stops growing at w."""
    from costhelpers import declared

    heads = 10 if pattern == "mixed" else 4
    m, _, _ = make_op("mha", "fixed", d=40, causal=True, heads=heads, pattern=pattern, **build)
    perturb_params(m)
    x = torch.randn(2, 23, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = m(x, Ctx())
        for sizes in ((5, 1, 3, 1, 13), (1,) * 23, (23,)):
            y, state = decode_in_pieces(m, x, sizes)
            assert (y - want).abs().max().item() < 1e-10 * want.abs().max().item()
        for t in (1, 2, 23):
            _, state = decode_in_pieces(m, x[:, :t], (t,))
            _, _, cost, ev = declared("mha", "fixed", 2, t, dtype=torch.float64, d=40, causal=True, heads=heads,
                                      pattern=pattern, **build)
            assert state.nbytes() == ev(cost.cache)


def test_bidirectional_reads_ahead():
    m, _, _ = make_op("mha", "fixed", d=D, causal=False, heads=4, pattern="next")
    with torch.no_grad(), pytest.raises(AssertionError, match="changed by"):
        assert_no_leak(lambda t: m(t, Ctx()), n=8, d=D)


def test_validation():
    base = "d_model = 32\nmodel m(causal=true) = input(features, d=32) -> mha(fixed, {}) -> head(linear, d_out=2)\n"
    with pytest.raises(EvoError, match="drop out"):
        evodsl.parse(base.format("dropout=0.1"))
    for bad in ("pattern=diagonals", "window=-1", "globals=0"):
        with pytest.raises(EvoError, match=bad.split("=")[0]):
            evodsl.parse(base.format(bad))
    with pytest.raises(EvoError, match="kv_heads"):
        evodsl.parse(base.format("heads=4, kv_heads=3"))
