"""mha(synthesizer) against the paper's equations (2005.00743 sec. 3), in float64, from the module's weights alone:
per query row i and head, the logits written entry by entry (dense: W2 relu(W1 x_i + b1) + b2 over positions
0 .. n-1; random: R[i, j]; factorized dense: A_{j div (L/a)} B_{j mod (L/a)}; factorized random: R1_i . R2_j;
vanilla: q_i . k_j / sqrt(dh); mixture: their softmax(alpha)-weighted sum), the causal ones cut at j <= i, then
softmax and the weighted sum of V (GQA: head hh reads K/V head hh // g). Decoding and leaks: test_decode.py,
test_leaks.py; padding: test_padding.py."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx, OpEnv, ShapeProblem, lookup
from ophelpers import head_projections, make_op, output_projection, perturb_params

D = 32


def logits(m, kind, x):
    """The logits [b, h, n, n] (query i, key j) from the paper's equation for `kind`, entry by entry over j."""
    sy = m.synth
    b, n, _ = x.shape
    if kind == "vanilla":
        q, k, _ = head_projections(m, x)
        g = m.heads // m.kv_heads
        return torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(g, 2)) / math.sqrt(m.head_dim)
    out = torch.zeros(b, m.heads, n, n, dtype=x.dtype)
    for i in range(n):
        if kind in ("dense", "factorized_dense"):
            hid = torch.relu(x[:, i] @ sy.w1.weight.T + (0 if sy.w1.bias is None else sy.w1.bias))  # [b, hidden]
        if kind == "factorized_dense":
            a, bb = sy.a, sy.bb
            A = (hid @ sy.wa.weight.T + (0 if sy.wa.bias is None else sy.wa.bias)).view(b, -1, a)
            B = (hid @ sy.wb.weight.T + (0 if sy.wb.bias is None else sy.wb.bias)).view(b, -1, bb)
        for hh in range(m.heads):
            if kind == "dense":  # W2's rows of positions 0 .. n-1
                out[:, hh, i] = hid @ sy.w2[hh, :n].T + (0 if sy.b2 is None else sy.b2[hh, :n])
                continue
            for j in range(n):
                if kind == "random":
                    out[:, hh, i, j] = sy.r[hh, i, j]
                elif kind == "factorized_random":
                    out[:, hh, i, j] = sy.r1[hh, i] @ sy.r2[hh, j]
                else:  # A repeated, B tiled
                    out[:, hh, i, j] = A[:, hh, j // bb] * B[:, hh, j % bb]
    return out


def reference(m, x, causal):
    b, n, _ = x.shape
    v = (x @ m.v_proj.weight.T + (0 if m.v_proj.bias is None else m.v_proj.bias)).view(b, n, m.kv_heads, m.head_dim)
    g = m.heads // m.kv_heads
    alpha = m.mix.softmax(-1) if m.mix is not None else torch.ones(m.heads, 1, dtype=x.dtype)
    S = sum(alpha[:, c, None, None] * logits(m, kind, x) for c, kind in enumerate(m.kinds))
    out = torch.zeros(b, n, m.heads, m.head_dim, dtype=x.dtype)
    for i in range(n):
        keys = i + 1 if causal else n
        for hh in range(m.heads):
            out[:, i, hh] = torch.einsum("bj,bjd->bd", S[:, hh, i, :keys].softmax(-1), v[:, :keys, hh // g])
    return output_projection(m, out.reshape(b, n, -1))


CASES = [  # kind, extra, n, kv_heads
    ("dense", {}, 13, None), ("dense", {"hidden": 12, "bias": False}, 24, 2),
    ("random", {}, 13, 2), ("random", {"trainable": False}, 1, None),
    ("factorized_dense", {}, 13, None), ("factorized_dense", {"factors": 3, "hidden": 16}, 24, 1),
    ("factorized_random", {"rank": 4}, 17, 2),
    ("mixture", {}, 13, 2), ("mixture", {"mix": "dense_random_vanilla"}, 11, None),
    ("mixture", {"mix": "factorized_random_vanilla", "rank": 3}, 7, 1),
]


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("kind, extra, n, kv_heads", CASES)
def test_synthesizer_matches_equation(kind, extra, n, kv_heads, causal):
    m, _, _ = make_op("mha", "synthesizer", d=D, causal=causal, heads=4, kv_heads=kv_heads, kind=kind, max_len=24,
                      **extra)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference(m, x, causal)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        if n > 1:  # the comparison sees the mask
            assert (y - reference(m, x, not causal)).abs().max().item() > 1e-6


def test_fixed_random_table_is_a_buffer_and_trains_nothing():
    m, _, _ = make_op("mha", "synthesizer", d=D, kind="random", max_len=16, trainable=False)
    assert "synth.r" in dict(m.named_buffers()) and "synth.r" not in dict(m.named_parameters())
    t, _, _ = make_op("mha", "synthesizer", d=D, kind="random", max_len=16)
    assert sum(p.numel() for p in t.parameters()) - sum(p.numel() for p in m.parameters()) == 8 * 16 * 16


def test_mixture_with_only_vanilla_weight_is_softmax_attention():
    """alpha -> (0, 1) on random + vanilla: the op is softmax attention with the same projections."""
    m, _, _ = make_op("mha", "synthesizer", d=D, causal=True, heads=4, kv_heads=2, kind="mixture", max_len=32)
    s, _, _ = make_op("mha", "softmax", d=D, causal=True, heads=4, kv_heads=2)
    perturb_params(s)
    m.load_state_dict(s.state_dict(), strict=False)
    with torch.no_grad():
        m.mix.copy_(torch.tensor([-1e4, 0.0]).expand(4, 2))
        x = torch.randn(2, 21, D, dtype=torch.float64)
        assert (m(x, Ctx()) - s(x, Ctx())).abs().max().item() < 1e-12


@pytest.mark.parametrize("build, match", [
    ({"kind": "random", "rank": 4}, "rank= is for kind=factorized_random"),
    ({"kind": "dense", "mix": "dense_vanilla"}, "mix= is for kind=mixture"),
    ({"kind": "factorized_dense", "max_len": 24, "factors": 5}, "factors=5 does not divide max_len=24"),
    ({"kind": "dense", "dropout": 0.1}, "no dropout"),
])
def test_bad_params_are_refused(build, match):
    args = ", ".join(f"{k}={v}" for k, v in build.items())
    src = f"d_model = 32\nmodel m(causal=true) = input(tokens, vocab=11) -> embed(token) -> mha(synthesizer, {args}) -> head(lm)\n"
    with pytest.raises(EvoError, match=match):
        evodsl.parse(src)


def test_longer_input_and_left_padding_are_refused():
    op = lookup("mha", "synthesizer")
    with pytest.raises(ShapeProblem, match="12 positions, more than max_len=8"):
        op.shape(op.params(max_len=8), OpEnv(in_shapes=(("b", 12, D),)))
    m, _, _ = make_op("mha", "synthesizer", d=D, kind="random", max_len=10)
    with pytest.raises(EvoError, match="E410.*max_len=10"):
        m(torch.randn(1, 11, D, dtype=torch.float64), Ctx())
    left = torch.ones(2, 8, dtype=torch.bool)
    left[0, :3] = False
    with pytest.raises(EvoError, match="E409.*right padding"):
        m(torch.randn(2, 8, D, dtype=torch.float64), Ctx(mask=left))
