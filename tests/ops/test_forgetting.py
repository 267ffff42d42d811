"""mha(forgetting) (FoX) against its defining equation, in float64: per head f_t = sigmoid(w_f . x_t + b_f) and
o_i = sum_{j <= i} softmax_j(q_i . k_j / sqrt(dh) + sum_{l = j+1..i} log f_l) v_j, written with explicit loops over
queries, heads and the gates between key and query (not the module's cumulative sums or its extended columns).
With every gate at 1 it is causal softmax attention; bidirectional models and dropout are refused. Decoding equals
the forward (test_decode.py), the forward does not leak (test_leaks.py), padding (test_padding.py)."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.decode import DecodeState
from evodsl.ops import Ctx, OpEnv, ShapeProblem, lookup
from ophelpers import assert_no_leak, decode_in_pieces, head_projections, make_op, output_projection, perturb_params

D = 32


def reference(m, x):
    q, k, v = head_projections(m, x)  # [b, n, h, dh], [b, n, kv, dh]
    b, n, h, dh = q.shape
    g = h // k.shape[2]
    log_f = torch.nn.functional.logsigmoid(x @ m.fgate.weight.T + m.fgate.bias)  # [b, n, h]
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for i in range(n):
        for hh in range(h):
            s = torch.stack([(q[:, i, hh] * k[:, j, hh // g]).sum(-1) / math.sqrt(dh)
                             + sum((log_f[:, l, hh] for l in range(j + 1, i + 1)), torch.zeros(b, dtype=x.dtype))
                             for j in range(i + 1)], -1)  # [b, i + 1]: the gates between key j and query i
            out[:, i, hh] = torch.einsum("bj,bjd->bd", s.softmax(-1), v[:, :i + 1, hh // g])
    return output_projection(m, out.reshape(b, n, h * dh))


CASES = [(1, None, None), (7, None, None), (23, 2, None), (33, 1, None), (17, 4, 6)]  # n, kv_heads, head_dim


@pytest.mark.parametrize("n, kv_heads, head_dim", CASES)
def test_forgetting_matches_equation(n, kv_heads, head_dim):
    m, _, _ = make_op("mha", "forgetting", d=D, causal=True, heads=4, kv_heads=kv_heads, head_dim=head_dim)
    perturb_params(m)
    with torch.no_grad():
        m.fgate.bias.add_(1.0)  # gates spread over (0, 1): some heads forget fast, some slowly
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference(m, x)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


def test_gates_at_one_are_causal_softmax_attention():
    """b_f = 40, w_f = 0: log f = -4e-18 per token, so the decay vanishes and FoX is mha(softmax) (within 1e-12,
    against outputs of order 1); with the gates at their perturbed values it differs by more than 1e-3."""
    m, _, _ = make_op("mha", "forgetting", d=D, causal=True, heads=4, kv_heads=2)
    s, _, _ = make_op("mha", "softmax", d=D, causal=True, heads=4, kv_heads=2)
    perturb_params(m)
    s.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("fgate")})
    x = torch.randn(2, 29, D, dtype=torch.float64)
    with torch.no_grad():
        assert (m(x, Ctx()) - s(x, Ctx())).abs().max().item() > 1e-3
        m.fgate.weight.zero_()
        m.fgate.bias.fill_(40.0)
        y, want = m(x, Ctx()), s(x, Ctx())
        assert want.abs().max().item() > 0.1
        assert (y - want).abs().max().item() < 1e-12


def test_causal_does_not_leak():
    m, _, _ = make_op("mha", "forgetting", d=D, causal=True, heads=4, kv_heads=2)
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=20, d=D)


def test_left_padding_equals_each_row_alone():
    """A left-padded row: its tokens read neither the padded keys nor the gates of padded positions."""
    m, _, _ = make_op("mha", "forgetting", d=D, causal=True, heads=4, kv_heads=2)
    perturb_params(m)
    x = torch.randn(2, 12, D, dtype=torch.float64)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :5] = False
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        assert (y[1, 5:] - m(x[1:, 5:], Ctx())[0]).abs().max().item() < 1e-12
        assert (y[0] - m(x[:1], Ctx())[0]).abs().max().item() < 1e-12


def test_step_by_step_equals_forward():
    """The cache (K, V of the K/V heads, D of every position): one token at a time and in chunks."""
    m, _, _ = make_op("mha", "forgetting", d=D, causal=True, heads=4, kv_heads=2)
    perturb_params(m)
    x = torch.randn(2, 13, D, dtype=torch.float64)
    with torch.no_grad():
        want = m(x, Ctx())
        for cuts in ([1] * 13, [5, 1, 4, 3]):
            assert (decode_in_pieces(m, x, cuts)[0] - want).abs().max().item() < 1e-12


def test_refusals():
    op = lookup("mha", "forgetting")
    with pytest.raises(ShapeProblem, match="causal only") as err:
        op.shape(op.params(heads=4), OpEnv(in_shapes=(("b", "n", D),)))
    assert "causal=true" in err.value.hint
    with pytest.raises(ShapeProblem, match="drop out"):
        op.shape(op.params(heads=4, dropout=0.1), OpEnv(in_shapes=(("b", "n", D),), causal=True))
    src = "d_model = 32\nmodel m(causal=false) = input(tokens, vocab=11) -> embed(token) -> mha(forgetting) -> head(lm)\n"
    with pytest.raises(EvoError, match="causal only"):
        evodsl.parse(src)
    with pytest.raises(EvoError, match="E302.*cannot apply pos\\(rope\\)"):
        evodsl.parse(src.replace("causal=false", "causal=true").replace("embed(token)", "embed(token) -> pos(rope)"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs_keep_the_decay_precise(dtype):
    """D in float32, split over two 16-bit columns: at n = 600 (|D| in the hundreds, where one bfloat16 column errs by
    ~1 in the scores) FoX's error against float64 stays within 3x of mha(softmax)'s own at that dtype."""
    m, _, _ = make_op("mha", "forgetting", d=D, causal=True, heads=4, kv_heads=2, dtype=dtype)
    ref, _, _ = make_op("mha", "forgetting", d=D, causal=True, heads=4, kv_heads=2)
    s, _, _ = make_op("mha", "softmax", d=D, causal=True, heads=4, kv_heads=2, dtype=dtype)
    s64, _, _ = make_op("mha", "softmax", d=D, causal=True, heads=4, kv_heads=2)
    ref.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    s.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("fgate")})
    s64.load_state_dict(ref.state_dict(), strict=False)
    x = torch.randn(2, 600, D, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        err = (m(x, Ctx()).double() - ref(x.double(), Ctx())).abs().max().item()
        base = (s(x, Ctx()).double() - s64(x.double(), Ctx())).abs().max().item()
    assert err < 3 * base, (err, base)


def test_widths_aligned_for_cuda_kernels_change_nothing():
    """On CUDA q', k', v' are zero-padded to a multiple of 8 wide (the fused kernels' rule): forced here on the CPU,
    the output is the same, in the forward and decoding."""
    m, _, _ = make_op("mha", "forgetting", d=D, causal=True, heads=4, kv_heads=2)
    perturb_params(m)
    x = torch.randn(2, 11, D, dtype=torch.float64)
    with torch.no_grad():
        want = m(x, Ctx())
        m.align = 8
        assert m.extended(*m.project(x)[:3], torch.zeros(2, 11, 4, dtype=torch.float64))[0].shape[-1] == 16
        assert (m(x, Ctx()) - want).abs().max().item() < 1e-12
        ctx = Ctx(cache=DecodeState())
        first = m(x[:, :6], ctx)
        ctx.offset = 6
        assert (torch.cat((first, m(x[:, 6:], ctx)), 1) - want).abs().max().item() < 1e-12
