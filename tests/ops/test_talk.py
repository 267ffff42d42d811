"""longconv(talk) against TaLK's equation (Lioutas and Guo 2020), in float64, written here token by token: the bounds
a^l = i - sigmoid(f^l x_i) l_max, a^r = i + sigmoid(f^r x_i) r_max per head (clipped to the sequence), and the window
sum as the paper's interpolated prefix sums mean, every token j weighted by the overlap of [j, j + 1) with
[a^l, a^r + 1) (the tokens inside fully, the boundary ones by their fractions), over l_max + r_max + 1, then W_o.
Decoding keeps the last l_max inputs and equals the forward piece by piece."""
from __future__ import annotations

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_every_parameter_learns, decode_in_pieces, make_op, perturb_params

D = 16


def reference(m, x, l_max, r_max, heads):
    b, n, d = x.shape
    off = torch.sigmoid(x @ m.bounds.weight.T + m.bounds.bias)
    al, ar = off[..., :heads], off[..., heads:]
    i = torch.arange(n, dtype=x.dtype)[:, None]
    lo = (i - al * l_max).clamp(min=0)[..., None]  # [b, i, h, 1]
    hi = (i + ar * r_max).clamp(max=n - 1)[..., None] + 1
    j = torch.arange(n, dtype=x.dtype)
    w = (torch.minimum(hi, j + 1) - torch.maximum(lo, j)).clamp(min=0)  # [b, i, h, j]: the overlap of [j, j + 1)
    y = torch.einsum("bihj,bjhc->bihc", w, x.view(b, n, heads, d // heads)).reshape(b, n, d)
    y = y / (l_max + r_max + 1)
    return y @ m.out.weight.T + (0 if m.out.bias is None else m.out.bias)


CASES = [(True, {"l_max": 5}), (True, {"l_max": 3, "heads": 4, "bias": False}), (False, {"l_max": 4}),
         (False, {"l_max": 2, "r_max": 6, "heads": 2}), (False, {"l_max": 40, "r_max": 0, "heads": 16})]


@pytest.mark.parametrize("causal,args", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("n", [1, 9, 23])
def test_talk_matches_the_window_sums(causal, args, n):
    m, p, _ = make_op("longconv", "talk", d=D, causal=causal, **args)
    perturb_params(m, scale=1.0)
    x = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    r_max = 0 if causal else (p.l_max if p.r_max is None else p.r_max)
    with torch.no_grad():
        want, got = reference(m, x, p.l_max, r_max, p.heads), m(x, Ctx())
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()


def test_the_bounds_learn_through_the_fractions():
    m, _, _ = make_op("longconv", "talk", d=D, causal=False, l_max=4, heads=2)
    assert_every_parameter_learns(m, d=D)


@pytest.mark.parametrize("args", [{"l_max": 5}, {"l_max": 1, "heads": 8}], ids=["five", "one"])
def test_decodes_with_a_flat_state(args):  # (the leak check: SEQ_BUILD in tests/ops/test_leaks.py)
    from costhelpers import declared

    m, p, _ = make_op("longconv", "talk", d=D, causal=True, **args)
    perturb_params(m, scale=1.0)
    x = torch.randn(2, 30, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = m(x, Ctx())
        for sizes in ((5, 1, 3, 1, 20), (1,) * 30):
            y, _ = decode_in_pieces(m, x, sizes)
            assert (y - want).abs().max().item() <= 1e-10 * want.abs().max().item()
        for t in (1, 7):
            _, state = decode_in_pieces(m, x[:, :t], (1,) * t)
            _, _, cost, ev = declared("longconv", "talk", 2, t, dtype=torch.float64, d=D, causal=True, **args)
            assert state.nbytes() == ev(cost.cache) == 2 * p.l_max * D * 8


def test_validation():
    base = "d_model = 32\nmodel m(causal={c}) = input(features, d=32) -> residual(longconv(talk{a})) -> head(linear, d_out=2)\n"
    evodsl.parse(base.format(c="true", a=", l_max=8, heads=4"))
    evodsl.parse(base.format(c="false", a=", l_max=8, r_max=2"))
    for c, bad, pattern in (("true", ", l_max=8, r_max=2", "r_max"), ("true", ", l_max=8, heads=5", "heads"),
                            ("true", "", "l_max"), ("true", ", l_max=0", "l_max"), ("false", ", l_max=3, r_max=-1", "r_max")):
        with pytest.raises(EvoError, match=pattern):
            evodsl.parse(base.format(c=c, a=bad))
