"""mha(sparse) against its defining equation, in float64: per query, the key set A1 u A2 of the strided or fixed
pattern built by plain Python from the paper's definitions (Child et al. 2019, section 4.2), one softmax over it
(the merged form); causal and bidirectional, GQA, odd lengths (a padded last block), one block and several."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl.ops import Ctx, OpEnv, ShapeProblem, lookup
from ophelpers import assert_no_leak, head_projections, make_op, output_projection, perturb_params

D = 32


def key_set(pattern: str, l: int, c: int, causal: bool, n: int, t: int) -> list[int]:
    """A(t) from the definitions: strided A1 = {t-l .. t} (both sides when bidirectional), A2 = {r : (t-r) mod
    l = 0}; fixed A1 = {r : r // l = t // l}, A2 = {r : r mod l >= l - c}; causal keeps r <= t."""
    keys = set()
    for r in range(n):
        if causal and r > t:
            continue
        if pattern == "strided":
            if abs(t - r) <= l or (t - r) % l == 0:
                keys.add(r)
        elif r // l == t // l or r % l >= l - c:
            keys.add(r)
    return sorted(keys)


def reference_sparse(m, x, pattern, l, c, causal, keep=None):
    b, n, _ = x.shape
    h, g, dh = m.heads, m.kv_heads, m.head_dim
    q, k, v = head_projections(m, x)
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for t in range(n):
        for bb in range(b):
            keys = key_set(pattern, l, c, causal, n, t)
            if keep is not None:
                keys = [r for r in keys if keep[bb, r]] or [t]
            for hh in range(h):
                kh = hh // (h // g)
                s = torch.stack([q[bb, t, hh] @ k[bb, r, kh] for r in keys]) / math.sqrt(dh)
                w = torch.softmax(s, 0)
                out[bb, t, hh] = sum(w[i] * v[bb, r, kh] for i, r in enumerate(keys))
    return output_projection(m, out.reshape(b, n, h * dh))


CASES = [("strided", 4, 1, 29, None), ("strided", 5, 1, 40, 2), ("strided", 8, 1, 7, 1), ("strided", 3, 1, 3, None),
         ("fixed", 4, 1, 29, None), ("fixed", 6, 2, 40, 2), ("fixed", 5, 4, 23, 1), ("fixed", 8, 3, 7, None)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pattern,l,c,n,kv_heads", CASES)
def test_sparse_matches_equation(pattern, l, c, n, kv_heads, causal):
    m, _, _ = make_op("mha", "sparse", d=D, heads=4, kv_heads=kv_heads, causal=causal, pattern=pattern, stride=l, c=c)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference_sparse(m, x, pattern, l, c, causal)
    assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pattern,l,c", [("strided", 4, 1), ("fixed", 5, 2)])
def test_padded_keys_are_left_out(pattern, l, c, causal):
    m, _, _ = make_op("mha", "sparse", d=D, heads=2, causal=causal, pattern=pattern, stride=l, c=c)
    perturb_params(m)
    n = 23
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[0, :6] = False  # left padding
    keep[1, 15:] = False  # right padding
    keep[1, 3] = False  # and a hole
    with torch.no_grad():
        y, ref = m(x, Ctx(mask=keep)), reference_sparse(m, x, pattern, l, c, causal, keep)
    assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


def test_the_patterns_are_sparse():
    """About l + n/l keys per query (strided), l + c n/l (fixed): far fewer than n."""
    n, l = 256, 16
    assert max(len(key_set("strided", l, 1, False, n, t)) for t in range(n)) <= 2 * l + 1 + n // l
    assert max(len(key_set("fixed", l, 2, False, n, t)) for t in range(n)) <= l + 2 * n // l


def test_bad_c_is_refused():
    op = lookup("mha", "sparse")
    env = OpEnv(in_shapes=(("b", "n", D),))
    with pytest.raises(ShapeProblem, match="c=8 is not less than stride=8"):
        op.shape(op.params(pattern="fixed", stride=8, c=8), env)
    with pytest.raises(ShapeProblem, match="fixed pattern"):
        op.shape(op.params(pattern="strided", stride=8, c=2), env)


@pytest.mark.parametrize("pattern,l,c", [("strided", 5, 1), ("fixed", 6, 2)])
@pytest.mark.parametrize("pos", [None, ("rope", {})])
def test_causal_sparse_does_not_leak(pattern, l, c, pos):
    """Over 5 blocks of l and a padded last one (test_leaks.py runs the strided pattern with every scheme)."""
    m, _, _ = make_op("mha", "sparse", d=D, heads=2, causal=True, pos=pos, pattern=pattern, stride=l, c=c)
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=33, d=D)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pattern,l,c,n", [("strided", 4, 1, 29), ("fixed", 6, 2, 40), ("strided", 9, 1, 7)])
def test_gathered_form_is_the_same_attention(pattern, l, c, n, causal):
    """The export's per-query gather form (symbolic n) equals the blocked form, with padding too."""
    from evodsl.ops.attention.sparse import _gathered, sparse_attention
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for _ in range(3))
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[0, :5] = False
    for mask in (None, keep):
        want = sparse_attention(q, k, v, pattern, l, c, causal, mask)
        assert (_gathered(q, k, v, pattern, l, c, causal, mask) - want).abs().max().item() < 1e-12
