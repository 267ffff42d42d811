"""rnn(sru) against the paper's equations (Lei et al. 2018, Section 2), in float64, written here token by token from
the module's weights: z, u, s = W x; f = sigmoid(u + v_f c + b_f), r = sigmoid(s + v_r c + b_r) from the previous
cell; c = f c + (1 - f) z; h = r c + (1 - r) x. The light recurrence (v != 0, a token loop) and the parallel form
(v = 0, the chunked scan: the same reference with v = 0) both equal it; the step form equals the forward piece by
piece with a state of constant size."""
from __future__ import annotations

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import assert_every_parameter_learns, assert_padded_row_alone, decode_in_pieces, make_op, perturb_params

D = 16


def projections(m, x):
    """W x, or SRU++'s W_o (Q + alpha softmax(Q K^T / sqrt(p), causal) V) with K, V = W_k Q, W_v Q, token by token."""
    if not m.attention:
        return x @ m.W.weight.T
    att = m.W
    Q = x @ att.q.weight.T
    p = Q.shape[-1]
    K, V = Q @ att.kv.weight[:p].T, Q @ att.kv.weight[p:].T
    rows = []
    for t in range(x.shape[1]):
        w = torch.softmax(torch.einsum("bp,bjp->bj", Q[:, t], K[:, :t + 1]) / p ** 0.5, -1)
        rows.append((Q[:, t] + att.alpha * torch.einsum("bj,bjp->bp", w, V[:, :t + 1])) @ att.o.weight.T)
    return torch.stack(rows, 1)


def reference(m, x):
    bias = m.bias
    U = projections(m, x)
    v = m.v if hasattr(m, "v") else torch.zeros(2 * D, dtype=x.dtype)
    c = torch.zeros(x.shape[0], D, dtype=x.dtype)
    hs = []
    for t in range(x.shape[1]):
        pre = U[:, t]
        z, u, s = pre[:, :D], pre[:, D:2 * D], pre[:, 2 * D:]
        f = torch.sigmoid(u + v[:D] * c + bias[:D])
        r = torch.sigmoid(s + v[D:] * c + bias[D:])
        c = f * c + (1 - f) * z
        hs.append(r * c + (1 - r) * x[:, t])
    return torch.stack(hs, 1)


def perturbed(**args):
    m, _, _ = make_op("rnn", "sru", d=D, causal=True, **args)
    perturb_params(m, scale=0.3)
    return m


ARGS = [{}, {"scan": True}, {"scan": True, "chunk": 1}, {"scan": True, "chunk": 7},
        {"attention": True}, {"attention": True, "scan": True, "chunk": 4, "proj": 6}]
IDS = ["light", "parallel", "parallel-T1", "parallel-T7", "sru++", "sru++-scan"]


@pytest.mark.parametrize("args", ARGS, ids=IDS)
@pytest.mark.parametrize("n", [1, 6, 37])
def test_sru_matches_the_recurrence(args, n):
    m = perturbed(**args)
    x = torch.randn(2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        want, got = reference(m, x), m(x, Ctx())
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()


def test_v_is_what_makes_it_nonlinear():
    """The light recurrence with v = 0 is the parallel form (the same weights)."""
    m, p = perturbed(), perturbed(scan=True, chunk=4)
    with torch.no_grad():
        p.W.weight.copy_(m.W.weight)
        p.bias.copy_(m.bias)
        m.v.zero_()
        x = torch.randn(2, 21, D, dtype=torch.float64)
        assert (m(x, Ctx()) - p(x, Ctx())).abs().max().item() <= 1e-12


@pytest.mark.parametrize("args", ARGS[:2] + ARGS[4:], ids=IDS[:2] + IDS[4:])
def test_decodes_in_pieces_with_a_constant_state(args):
    """The step form equals the forward piece by piece (the harness, tests/ops/test_leaks.py, checks for leaks);
    its state is the declared kv_cache: c alone (constant), or with SRU++'s attention c and the keys and values
    of every position (growing with the length)."""
    from costhelpers import declared

    m = perturbed(**args)
    x = torch.randn(2, 30, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = m(x, Ctx())
        for sizes in ((5, 1, 3, 1, 20), (1,) * 30, (30,)):
            y, _ = decode_in_pieces(m, x, sizes)
            assert (y - want).abs().max().item() <= 1e-10 * want.abs().max().item()
        for t in (1, 4, 30):
            _, state = decode_in_pieces(m, x[:, :t], (1,) * t)
            _, _, cost, ev = declared("rnn", "sru", 2, t, dtype=torch.float64, d=D, causal=True, **args)
            p = m.W.q.out_features if m.attention else 0
            assert state.nbytes() == ev(cost.cache) == 2 * (D + 2 * p * t) * 8


@pytest.mark.parametrize("args", ARGS[:2] + ARGS[4:], ids=IDS[:2] + IDS[4:])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_enters_no_state(args, side):
    assert_padded_row_alone(perturbed(**args), side, d=D)


@pytest.mark.parametrize("args", ARGS[:2] + ARGS[4:], ids=IDS[:2] + IDS[4:])
def test_every_parameter_learns(args):
    assert_every_parameter_learns(perturbed(**args), d=D)


@pytest.mark.slow  # ~8 s: an export attempt
def test_the_light_recurrence_refuses_a_symbolic_export(tmp_path):
    src = ("d_model = 16\nmodel m(causal=true) = input(features, d=16) -> residual(rnn(sru)) -> head(linear, d_out=4)\n")
    with pytest.raises(EvoError, match="E455|scan=true"):
        evodsl.export(src, tmp_path / "m.onnx")


def test_validation():
    base = "vocab = 50\nd_model = 32\nmodel m(causal={c}) = input(tokens) -> embed(token) -> norm -> rnn(sru{a}) -> norm -> head(lm)\n"
    evodsl.parse(base.format(c="true", a=", scan=true"))
    with pytest.raises(EvoError, match="causal only"):
        evodsl.parse(base.format(c="false", a=""))
    for bad in ("chunk=0", "scan=2"):
        with pytest.raises(EvoError, match=bad.split("=")[0]):
            evodsl.parse(base.format(c="true", a=", " + bad))
