"""mha(jukebox) against its defining equation, in float64: per query, the key set of the row, column or
previous-row pattern built by plain Python from the definitions (Dhariwal et al. 2020, appendix B.2: the sequence
folded into rows of l), one softmax over it; causal and bidirectional, GQA, odd lengths (a padded last row), one
row and several; padding, the export's gather form, and the refusal of left padding."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_no_leak, head_projections, make_op, output_projection, perturb_params

D = 32


def key_set(pattern: str, l: int, causal: bool, n: int, t: int) -> list[int]:
    """A(t): row {r : r // l = t // l}, column {r : r mod l = t mod l}, prev_row {r : r // l = t // l - 1};
    causal keeps r <= t (prev_row's set is causal as it stands)."""
    if pattern == "row":
        keys = [r for r in range(n) if r // l == t // l]
    elif pattern == "column":
        keys = [r for r in range(n) if r % l == t % l]
    else:
        keys = [r for r in range(n) if r // l == t // l - 1]
    return [r for r in keys if r <= t] if causal else keys


def reference(m, x, pattern, l, causal, keep=None):
    b, n, _ = x.shape
    h, g, dh = m.heads, m.kv_heads, m.head_dim
    q, k, v = head_projections(m, x)
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        for t in range(n):
            keys = key_set(pattern, l, causal, n, t)
            if keep is not None:
                keys = [r for r in keys if keep[bb, r]]
                if not keys and pattern != "prev_row":
                    keys = [t]
            for hh in range(h):
                if not keys:  # the first row's previous row: nothing to read, o = 0
                    continue
                kh = hh // (h // g)
                s = torch.stack([q[bb, t, hh] @ k[bb, r, kh] for r in keys]) / math.sqrt(dh)
                w = torch.softmax(s, 0)
                out[bb, t, hh] = sum(w[i] * v[bb, r, kh] for i, r in enumerate(keys))
    return output_projection(m, out.reshape(b, n, h * dh))


PATTERNS = ["row", "column", "prev_row"]
SIZES = [(4, 29, None), (5, 40, 2), (8, 7, 1), (3, 3, None), (6, 36, 1)]  # odd n, l | n, one row (l >= n)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("l,n,kv_heads", SIZES)
def test_jukebox_matches_equation(pattern, l, n, kv_heads, causal):
    m, _, _ = make_op("mha", "jukebox", d=D, heads=4, kv_heads=kv_heads, causal=causal, pattern=pattern, block=l)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n + l), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference(m, x, pattern, l, causal)
    assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


def test_the_first_row_reads_nothing_in_prev_row():
    """Jukebox's previous block of zeros: row 0's attention output is 0, so the layer gives o_proj's bias."""
    m, _, _ = make_op("mha", "jukebox", d=D, heads=2, causal=True, pattern="prev_row", block=5)
    perturb_params(m)
    x = torch.randn(1, 12, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
    assert torch.allclose(y[0, :5], m.o_proj.bias.expand(5, D), atol=1e-12)
    assert (y[0, 5:] - m.o_proj.bias).abs().min().item() > 0


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_padded_keys_are_left_out(pattern, causal):
    m, _, _ = make_op("mha", "jukebox", d=D, heads=2, kv_heads=1, causal=causal, pattern=pattern, block=4)
    perturb_params(m)
    n = 23
    x = torch.randn(3, n, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    keep = torch.ones(3, n, dtype=torch.bool)
    keep[1, 15:] = False  # right padding
    keep[2, 2:] = False  # a sequence shorter than one row
    with torch.no_grad():
        y, ref = m(x, Ctx(mask=keep)), reference(m, x, pattern, 4, causal, keep)
    assert (y - ref)[keep].abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
    assert torch.isfinite(y).all()


def test_left_padding_is_refused():
    m, _, _ = make_op("mha", "jukebox", d=D, heads=2, pattern="row", block=4)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, :3] = False
    with pytest.raises(EvoError, match="E409"):
        m(torch.zeros(2, 9, D, dtype=torch.float64), Ctx(mask=keep))


@pytest.mark.parametrize("pattern", ["row", "column"])
def test_causal_jukebox_does_not_leak(pattern):
    """Over 6 rows of 5 and a padded last one (test_leaks.py runs the row pattern)."""
    m, _, _ = make_op("mha", "jukebox", d=D, heads=2, kv_heads=1, causal=True, pattern=pattern, block=5)
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=33, d=D)


def test_prev_row_does_not_leak():
    """prev_row never reads its own row, so assert_no_leak's negative control (position t + 1 moves with token
    t + 1) does not hold; here: changing tokens t + 1 .. leaves outputs 0 .. t, and changing row R moves row R + 1."""
    m, _, _ = make_op("mha", "jukebox", d=D, heads=2, kv_heads=1, causal=True, pattern="prev_row", block=5)
    perturb_params(m)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 33, D, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        for t in range(32):
            x2 = x.clone()
            x2[:, t + 1:] = torch.randn(2, 32 - t, D, generator=g, dtype=torch.float64) * 3
            y2 = m(x2, Ctx())
            assert (y2[:, :t + 1] - y[:, :t + 1]).abs().max().item() <= 1e-10, f"position <= {t} moved"
            if (t + 1) % 5 == 0 and t + 6 <= 33:  # tokens of row (t+1)/5 - 1 .. changed: the next row moves
                x3 = x.clone()
                x3[:, t - 4:t + 1] += 1.0
                assert (m(x3, Ctx())[:, t + 1:t + 6] - y[:, t + 1:t + 6]).abs().min().item() > 1e-6


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("l,n", [(4, 29), (6, 36), (9, 7)])
def test_gathered_form_is_the_same_attention(pattern, l, n, causal):
    """The export's per-query gather form (symbolic n) equals the folded form, with right padding too."""
    from evodsl.ops.attention.jukebox import _gathered, factorized
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for _ in range(3))
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[0, n - 5:] = False
    for mask in (None, keep):
        want = factorized(q, k, v, pattern, l, causal, mask).view(2, n, 3, 8).transpose(1, 2)
        got = _gathered(q, k, v, pattern, l, causal, mask)
        real = torch.ones(n, dtype=torch.bool) if mask is None else mask[:, None, :]
        assert (got - want).masked_fill(~real[..., None], 0).abs().max().item() < 1e-12


def test_column_scores_are_n_squared_over_l():
    """Per query about l keys (row, prev_row) or n / l (column): far fewer than n."""
    n, l = 256, 16
    for pattern, most in (("row", l), ("prev_row", l), ("column", n // l)):
        assert max(len(key_set(pattern, l, False, n, t)) for t in range(n)) == most
