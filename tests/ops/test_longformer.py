"""mha(longformer) against its defining equation in float64, with each query's key set written out: the window
t + d j (|j| <= w/2; causal j <= 0) within the sequence, less the global positions, plus the g global keys, in
one softmax; the g global queries against every key through their own projections. Padding, GQA, dilation,
the causal form, and what it refuses."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx, OpEnv, ShapeProblem, lookup
from ophelpers import assert_every_parameter_learns, assert_no_leak, head_projections, make_op, output_projection, perturb_params

D = 32


def _linear(layer, x):
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def key_set(t: int, n: int, window: int, g: int, d: int, causal: bool, keep) -> list[int]:
    """The keys local query t reads: the global ones, then its window's others (positions, ascending)."""
    half = window // 2
    steps = range(-half, 1) if causal else range(-half, half + 1)
    win = {t + d * j for j in steps if 0 <= t + d * j < n and t + d * j >= g}
    return [r for r in sorted(set(range(min(g, n))) | win) if keep[r]]


def reference_longformer(m, x, window, g, d, causal, mask=None):
    """[b, n, d_model]; rows of padded queries are left at o_proj(0) (not compared)."""
    b, n, _ = x.shape
    h, kv, dh = m.heads, m.kv_heads, m.head_dim
    q, k, v = head_projections(m, x)  # [b, n, heads, dh]
    if g:
        qg = _linear(m.query_global, x).view(b, n, h, dh)
        kg, vg = _linear(m.key_global, x).view(b, n, kv, dh), _linear(m.value_global, x).view(b, n, kv, dh)
    keep = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for i in range(b):
        for t in range(n):
            if not keep[i, t]:
                continue
            if t < g:
                keys = [r for r in range(n) if keep[i, r]]
                qq, kk, vv = qg[i, t], kg[i, keys], vg[i, keys]
            else:
                keys = key_set(t, n, window, g, d, causal, keep[i])
                qq, kk, vv = q[i, t], k[i, keys], v[i, keys]
            for hh in range(h):
                s = kk[:, hh // (h // kv)] @ qq[hh] / math.sqrt(dh)  # [len(keys)]
                p = torch.exp(s - s.max())
                out[i, t, hh] = (p / p.sum()) @ vv[:, hh // (h // kv)]
    return output_projection(m, out.reshape(b, n, h * dh))


CASES = [  # causal, window, globals, dilation, n, kv_heads
    (False, 4, 0, 1, 37, None),  # the banded kernel (d = 1, g = 0)
    (False, 6, 1, 1, 77, None),  # a CLS token, three blocks of 32, the last partial
    (False, 8, 3, 1, 70, 2),  # GQA; globals inside the first windows
    (False, 4, 0, 2, 75, None),  # dilated: two residue classes of 38 and 37
    (False, 6, 2, 3, 67, 2),  # dilated with globals: residues meet the globals unevenly
    (False, 64, 2, 2, 50, None),  # a window wider than the sequence
    (False, 2, 5, 1, 9, None),  # more globals than window
    (True, 6, 0, 1, 70, None),  # causal: the banded kernel, keys t-3 .. t
    (True, 8, 0, 2, 71, 2),  # causal dilated
    (True, 4, 0, 3, 40, None),
]


@pytest.mark.parametrize("causal,window,g,d,n,kv_heads", CASES)
def test_longformer_matches_equation(causal, window, g, d, n, kv_heads):
    m, _, _ = make_op("mha", "longformer", d=D, causal=causal, heads=4, kv_heads=kv_heads, window=window,
                      globals=g, dilation=d)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference_longformer(m, x, window, g, d, causal)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        # the comparison sees the window's edge, the dilation and the globals
        if window < n:
            assert (y - reference_longformer(m, x, window + 2, g, d, causal)).abs().max().item() > 1e-6
        if d > 1:
            assert (y - reference_longformer(m, x, window, g, 1, causal)).abs().max().item() > 1e-6
        if g:
            assert (y - reference_longformer(m, x, window, g - 1, d, causal))[:, g:].abs().max().item() > 1e-6


@pytest.mark.parametrize("causal,g,d,side", [(False, 0, 1, "left"), (False, 2, 1, "right"), (False, 3, 2, "right"),
                                             (False, 0, 3, "left"), (True, 0, 2, "left"), (True, 0, 1, "left")])
def test_padded_keys_are_out_of_every_key_set(causal, g, d, side):
    """A padded batch against the reference with the padded keys taken out of each key set; every row finite."""
    n = 70
    m, _, _ = make_op("mha", "longformer", d=D, causal=causal, heads=4, kv_heads=2, window=6, globals=g, dilation=d)
    perturb_params(m)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, n, D, generator=gen, dtype=torch.float64)
    mask = torch.arange(n)[None, :] < torch.tensor([n, 41, 2])[:, None]
    mask = mask.flip(1) if side == "left" else mask
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        ref = reference_longformer(m, x, 6, g, d, causal, mask)
    assert torch.isfinite(y).all()
    assert (y - ref)[mask].abs().max().item() < 1e-10 * ref.abs().max().item()


def test_gradients_reach_every_projection():
    """Training: the window, the global keys and the global rows all take part in the backward."""
    m, _, _ = make_op("mha", "longformer", d=D, heads=4, window=4, globals=2, dilation=2)
    perturb_params(m)
    assert_every_parameter_learns(m, d=D)


def test_symbolic_form_matches_the_blocked_one():
    """The export form (each query gathers its keys) equals the blocked kernel, globals, dilation and padding."""
    from evodsl.ops.attention._dilated_band import dilated_band, gathered_dilated_band

    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 53, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.arange(53)[None, :] < torch.tensor([[53], [30]])
    for lo, hi, d, g, km in [(3, 3, 2, 2, mask), (4, 0, 3, 0, None), (2, 2, 1, 4, mask), (40, 40, 2, 1, None)]:
        a = dilated_band(q, k, v, lo, hi, d, g, key_mask=km)
        b = gathered_dilated_band(q, k, v, lo, hi, d, g, 0.0, km)
        keep = slice(None) if km is None else km
        assert (a - b)[keep].abs().max().item() < 1e-12


def test_causal_dilated_does_not_leak():
    m, _, _ = make_op("mha", "longformer", d=D, causal=True, heads=4, kv_heads=2, window=4, dilation=3)
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=50, d=D)


def test_refusals():
    op = lookup("mha", "longformer")
    env = OpEnv(in_shapes=(("b", "n", D),))
    with pytest.raises(ShapeProblem, match="window=5 is odd"):
        op.shape(op.params(window=5, heads=4), env)
    with pytest.raises(ShapeProblem, match="no causal form") as err:
        op.shape(op.params(window=4, globals=1, heads=4), OpEnv(in_shapes=(("b", "n", D),), causal=True))
    assert "globals=0" in err.value.hint
    src = ("d_model = 32\nmodel m(causal=true) = input(tokens, vocab=11) -> embed(token) "
           "-> mha(longformer, window=4, globals=1) -> head(lm)\n")
    with pytest.raises(EvoError, match="E300.*no causal form"):
        evodsl.parse(src)
    with pytest.raises(EvoError, match="E302.*cannot apply pos\\(rope\\)"):
        evodsl.parse(src.replace("embed(token)", "embed(token) -> pos(rope)").replace(", globals=1", ""))
    m, _, _ = make_op("mha", "longformer", d=D, heads=4, window=4, globals=1)
    left = torch.ones(2, 10, dtype=torch.bool)
    left[1, :3] = False
    with pytest.raises(EvoError, match="E409.*right padding"):
        m(torch.randn(2, 10, D, dtype=torch.float64), Ctx(mask=left))


def test_global_projections_only_with_globals():
    """HF's query_global, key_global, value_global: three d x d layers with biases when g > 0, none without."""
    with_g, _, _ = make_op("mha", "longformer", d=D, heads=4, window=4, globals=1)
    without, _, _ = make_op("mha", "longformer", d=D, heads=4, window=4)
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert count(with_g) - count(without) == 3 * (D * D + D)


def test_globals_grow_as_declared():
    """The growth harness (tests/growth.py, n = 1k..8k) on the bidirectional op with global tokens and dilation,
    which test_growth.py's one row per variant (run causal too, where globals are refused) leaves out: the
    window by blocks and the [g x n] global rows stay linear in n, as the cost declares."""
    from costhelpers import declared
    from growth import NS, check_growth, declared_growth, measure_growth

    args = dict(dtype=torch.float32, d=64, heads=2, window=64, globals=2, dilation=2)
    module, _, _, _ = declared("mha", "longformer", 1, NS[0], **args)
    module.train()

    def at(n):
        _, _, cost, ev = declared("mha", "longformer", 1, n, **args)
        return ev(cost.fwd), ev(cost.peak) + n * 64 * 4, ev(cost.bwd)

    got = measure_growth(lambda x: module(x, Ctx()), lambda n: torch.randn(1, n, 64, generator=torch.Generator()
                                                                          .manual_seed(n)), exclude=[module], train=True)
    flops, peak, bwd = declared_growth(at)
    check_growth("mha(longformer, globals=2, dilation=2)", got, flops, peak, bwd)
