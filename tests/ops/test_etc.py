"""mha(etc) against ETC's global-local attention written from the paper (Ainslie et al. 2020, section 2.1), in
float64: an explicit key list per query, the first G positions global (g2g + g2l: every position, or with
segment=S the globals and the long tokens i S .. i S + S - 1), the others long (l2l + l2g: the globals and the
long tokens within r), one softmax each, o_proj on the long rows and global_out on the global rows. Then the
special case the authors' fused attention was built for (a window covering the input, shared projections:
softmax attention), the export's padded form, and the refusals."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import head_projections, make_op, perturb_params

D = 32


def _linear(layer, x):
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def reference(m, x, r, G, S=None, mask=None, hard=None, rel=0):
    """y [b, N, d] from the equations, query by query (mask: bool [b, N], False = a padded key). hard: which side
    reads only its own (default: g2l when there are segments); rel=k: the labels' scores from the module's
    tables m.rel_long / m.rel_global (a, [2k + 3, h, dh]) and their biases (c, [2k + 3, h])."""
    q, k, v = head_projections(m, x)  # [b, N, h, dh], [b, N, kv, dh]
    b, N, h, dh = q.shape
    grp = h // k.shape[2]
    hard = hard or ("g2l" if S is not None else "none")

    def seg(t):  # the global whose segment holds long position t, or -1
        return (t - G) // S if S is not None and t >= G and (t - G) // S < G else -1

    def label(i, j):
        if (i < G) == (j < G):  # l2l, g2g: the clipped offset
            return min(abs(j - i), rel) if j >= i else rel + min(i - j, rel)
        long, glob = (j, i) if i < G else (i, j)
        return 2 * rel + 2 if seg(long) == glob else 2 * rel + 1

    out = torch.zeros(b, N, h, dh, dtype=x.dtype)
    for i in range(N):
        if i < G:  # g2g + g2l
            keys = [j for j in range(N) if j < G or hard not in ("g2l", "both") or seg(j) == i]
        else:  # l2g + l2l
            keys = [j for j in range(N) if (j < G and (hard not in ("l2g", "both") or seg(i) == j))
                    or (j >= G and abs(i - j) <= r)]
        if rel:
            a, c = (m.rel_global, m.rel_global_bias) if i < G else (m.rel_long, m.rel_long_bias)
        for bb in range(b):
            kept = [j for j in keys if mask is None or mask[bb, j]] or [i]  # a query with no key reads its own
            for hh in range(h):
                s = torch.stack([q[bb, i, hh] @ k[bb, j, hh // grp]
                                 + (q[bb, i, hh] @ a[label(i, j), hh] + c[label(i, j), hh] if rel else 0)
                                 for j in kept]) / math.sqrt(dh)
                w = s.softmax(0)
                out[bb, i, hh] = sum(w[c] * v[bb, j, hh // grp] for c, j in enumerate(kept))
    o = out.reshape(b, N, h * dh)
    return torch.cat((_linear(m.global_out, o[:, :G]), _linear(m.o_proj, o[:, G:])), 1)


CASES = [  # N, r, G, S, kv_heads
    (40, 3, 2, None, None),  # N a multiple of no block (32)
    (70, 5, 3, None, 2),  # three blocks, grouped K/V heads
    (70, 5, 3, 16, 1),  # hard g2l: segments of 16 (the last one cut), one K/V head
    (50, 4, 4, 5, None),  # hard g2l: long tokens past G S belong to no segment
    (37, 40, 2, None, 2),  # a window past both ends: every long token reads every position
    (3, 2, 2, None, None),  # one long token
    (2, 3, 4, 3, 2), (4, 3, 4, None, None),  # N <= G: every position global
    (9, 1, 1, 3, None),  # radius 1
]


@pytest.mark.parametrize("N, r, G, S, kv_heads", CASES)
def test_etc_matches_equation(N, r, G, S, kv_heads):
    m, _, _ = make_op("mha", "etc", d=D, heads=4, kv_heads=kv_heads, radius=r, globals=G, segment=S)
    perturb_params(m)
    x = torch.randn(2, N, D, generator=torch.Generator().manual_seed(N), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference(m, x, r, G, S)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        if N > G + r + 1:  # the comparison sees the window: a wider one differs
            assert (y - reference(m, x, r + 1, G, S)).abs().max().item() > 1e-6
        if S is not None and N > G + S:  # and the segments
            assert (y - reference(m, x, r, G, None)).abs().max().item() > 1e-6


REL_CASES = [  # N, r, G, S, hard, rel, kv_heads
    (40, 3, 2, None, None, 2, None),  # labels only; offsets clipped at 2 inside a window of 3
    (70, 5, 3, 16, "both", 3, 2),  # hard l2g and g2l, three blocks, grouped K/V heads
    (70, 5, 3, 16, "l2g", 0, None),  # hard l2g alone, no labels
    (50, 4, 4, 5, "none", 6, 1),  # segments label l2g / g2l only; clip past the window; past G S: no segment
    (3, 2, 4, 2, None, 2, None),  # N <= G: every position global, g2g labels
    (37, 40, 2, 9, "l2g", 4, 2),  # a window past both ends
]


@pytest.mark.parametrize("N, r, G, S, hard, rel, kv_heads", REL_CASES)
def test_etc_labels_and_hard_l2g_match_equation(N, r, G, S, hard, rel, kv_heads):
    m, _, _ = make_op("mha", "etc", d=D, heads=4, kv_heads=kv_heads, radius=r, globals=G, segment=S, hard=hard,
                      rel=rel)
    perturb_params(m)
    x = torch.randn(2, N, D, generator=torch.Generator().manual_seed(N + rel), dtype=torch.float64)
    mask = torch.arange(N)[None, :] < torch.tensor([[N], [max(1, N - 7)]])
    with torch.no_grad():
        for key_mask in (None, mask):
            y, ref = m(x, Ctx(mask=key_mask)), reference(m, x, r, G, S, key_mask, hard, rel)
            real = mask if key_mask is not None else torch.ones_like(mask)
            assert (y - ref)[real].abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
            got = m._exported(x, key_mask)  # the export's gathered form
            assert (got - ref)[real].abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        if rel:  # the labels matter: without them (or with another clip) the output differs
            assert (y - reference(m, x, r, G, S, None, hard, 0)).abs().max().item() > 1e-6 or N <= G
        if hard in ("l2g", "both") and N > G:
            assert (y - reference(m, x, r, G, S, None, "none" if hard == "l2g" else "g2l", rel)).abs().max() > 1e-6


def test_right_padding_equals_equation_with_masked_keys():
    m, _, _ = make_op("mha", "etc", d=D, heads=4, kv_heads=2, radius=4, globals=3, segment=10)
    perturb_params(m)
    x = torch.randn(3, 45, D, dtype=torch.float64)
    mask = torch.arange(45)[None, :] < torch.tensor([[45], [30], [2]])
    with torch.no_grad():
        y, ref = m(x, Ctx(mask=mask)), reference(m, x, 4, 3, 10, mask)
        assert (y - ref)[mask].abs().max().item() < 1e-10 * ref.abs().max().item()
        assert torch.isfinite(y).all()


def test_a_window_over_everything_with_shared_projections_is_softmax_attention():
    """The authors' fused attention reduces to standard attention when the local radius covers the long input
    and the projections are shared (etcmodel's FusedGlobalLocalAttention docstring): global_out = o_proj."""
    m, _, _ = make_op("mha", "etc", d=D, heads=4, kv_heads=2, radius=64, globals=3)
    s, _, _ = make_op("mha", "softmax", d=D, heads=4, kv_heads=2)
    perturb_params(s)
    m.load_state_dict(s.state_dict(), strict=False)
    m.global_out.load_state_dict(s.o_proj.state_dict())
    x = torch.randn(2, 50, D, dtype=torch.float64)
    with torch.no_grad():
        assert (m(x, Ctx()) - s(x, Ctx())).abs().max().item() < 1e-12


def test_export_form_equals_forward():
    """_exported (a symbolic N: the input padded to max(N, G + 1) positions, the extra keys masked and rows cut)
    equals the forward at every N, N <= G included, with grouped K/V heads, segments and right padding."""
    for G, S, kv in ((2, None, None), (3, 4, 2)):
        m, _, _ = make_op("mha", "etc", d=D, heads=4, kv_heads=kv, radius=3, globals=G, segment=S)
        perturb_params(m)
        for N in (1, G, G + 1, 12, 37):
            x = torch.randn(2, N, D, generator=torch.Generator().manual_seed(N), dtype=torch.float64)
            mask = torch.arange(N)[None, :] < torch.tensor([[N], [max(1, N - 4)]])
            for key_mask in (None, mask):
                with torch.no_grad():
                    got, want = m._exported(x, key_mask), m(x, Ctx(mask=key_mask))
                real = mask[..., None] if key_mask is not None else 1
                assert ((got - want) * real).abs().max().item() < 1e-12, (G, N)


def test_refusals():
    m, _, _ = make_op("mha", "etc", d=D, heads=4, radius=3, globals=2)
    left = torch.ones(2, 10, dtype=torch.bool)
    left[1, :3] = False
    with pytest.raises(EvoError, match="E409.*right padding"):
        m(torch.randn(2, 10, D, dtype=torch.float64), Ctx(mask=left))
    src = ("d_model = 32\nmodel m(causal=CAUSAL) = input(tokens, vocab=11) -> embed(token) "
           "-> mha(etc, radius=3, globals=2ARGS) -> head(lm)\n")
    with pytest.raises(EvoError, match="E301.*no causal form"):
        evodsl.parse(src.replace("CAUSAL", "true").replace("ARGS", ""))
    with pytest.raises(EvoError, match="no dropout on its attention weights"):
        evodsl.parse(src.replace("CAUSAL", "false").replace("ARGS", ", dropout=0.1"))
    with pytest.raises(EvoError, match="E300.*needs segment"):
        evodsl.parse(src.replace("CAUSAL", "false").replace("ARGS", ", hard=l2g"))
    for bad in (", globals=0", ", radius=0", ", segment=0", ", rel=-1", ", hard=g2g"):
        with pytest.raises(EvoError, match="E2"):
            evodsl.parse(src.replace("CAUSAL", "false").replace(", globals=2ARGS", "").replace("radius=3", "radius=3" + bad))
    evodsl.parse(src.replace("CAUSAL", "false").replace("ARGS", ", segment=8"))  # the control: accepted
