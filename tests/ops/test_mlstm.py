"""rnn(mlstm) against xLSTM's mLSTM (arXiv:2405.04517 eqs. 19-27 and the block of figure 10), in float64, written here
token by token from the module's weights and without the stabiliser: the up-projection, the causal depthwise
convolution tap by tap, swish, q/k/v, the gates from [q; k; v], C_t = f_t C_(t-1) + exp(i~_t) k_t v_t^T,
n_t = f_t n_(t-1) + exp(i~_t) k_t, h_t = q_t C_t / max(|q_t . n_t|, 1), the per-head LayerNorm, the learnable skip,
the swish(z) gate and the down-projection. The stabilised chunked form equals it at several chunk sizes, the step
form equals the forward piece by piece with a state of constant size, and the stabiliser changes nothing."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from evodsl.ops.rnn._mlstm_kernel import chunked_mlstm, parallel_mlstm, recurrent_mlstm
from ophelpers import (assert_no_leak, assert_padded_row_alone, assert_steps_and_pieces_agree, decode_in_pieces,
                       make_op, perturb_params)

D = 16


def lin(layer, x):
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def reference(m, u):
    b, n, _ = u.shape
    E, H, dh, kk = m.E, m.H, m.dh, m.k
    up = lin(m.proj_up, u)
    x, z = up[..., :E], up[..., E:]
    w = m.conv1d.weight[:, 0]  # [E, k]: tap i reads position t - (k - 1) + i
    xc = torch.zeros(b, n, E, dtype=u.dtype)
    for t in range(n):
        acc = m.conv1d.bias.expand(b, E).clone()
        for i in range(kk):
            if t - (kk - 1) + i >= 0:
                acc = acc + w[:, i] * x[:, t - (kk - 1) + i]
        xc[:, t] = acc * torch.sigmoid(acc)
    q, k, v = lin(m.q_proj, xc), lin(m.k_proj, xc) / dh ** 0.5, lin(m.v_proj, x)
    qkv = torch.cat((q, lin(m.k_proj, xc), v), -1)
    it, ft = lin(m.igate, qkv), lin(m.fgate, qkv)  # [b, n, H]
    f = ft.exp() if m.exp_forget else torch.sigmoid(ft)
    h = torch.zeros(b, n, H, dh, dtype=u.dtype)
    for bb in range(b):
        for hh in range(H):
            Cm, nv = torch.zeros(dh, dh, dtype=u.dtype), torch.zeros(dh, dtype=u.dtype)
            sl = slice(hh * dh, (hh + 1) * dh)
            for t in range(n):
                Cm = f[bb, t, hh] * Cm + it[bb, t, hh].exp() * torch.outer(v[bb, t, sl], k[bb, t, sl])
                nv = f[bb, t, hh] * nv + it[bb, t, hh].exp() * k[bb, t, sl]
                h[bb, t, hh] = Cm @ q[bb, t, sl] / torch.clamp((nv @ q[bb, t, sl]).abs(), min=1.0)
    h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + m.eps)
    h = h.reshape(b, n, E) * m.norm_weight
    return lin(m.proj_down, (h + m.skip * xc) * (z * torch.sigmoid(z)))


CASES = [  # n, build
    (5, {"heads": 2}), (23, {"heads": 4, "chunk": 8}), (19, {"heads": 1, "chunk": 5, "forget": "exp", "conv": 2}),
    (13, {"heads": 2, "expand": 1, "chunk": 64, "bias": True}), (3, {"heads": 2, "chunk": 16, "conv": 1}),
]


@pytest.mark.parametrize("n,build", CASES)
def test_mlstm_is_the_recurrence(n, build):
    m, _, _ = make_op("rnn", "mlstm", d=D, causal=True, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        want = reference(m, x)
        assert (m(x, Ctx()) - want).abs().max() < 1e-10 * want.abs().max()


@pytest.mark.parametrize("n,build", CASES[:3])
def test_forms_agree(n, build):
    """Chunked (the forward) at other chunk sizes, the step (a token at a time), chunked from a state (a prompt, then
    pieces): equal to 1e-10."""
    m, _, _ = make_op("rnn", "mlstm", d=D, causal=True, **build)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        for C in (1, 3, 7, 64):
            m.chunk = C
            assert (m(x, Ctx()) - y).abs().max() < 1e-10 * y.abs().max()
        assert_steps_and_pieces_agree(m, x, y, scale=y.abs().max())


@pytest.mark.parametrize("forget", ["sigmoid", "exp"])
def test_the_stabiliser_changes_nothing(forget):
    """The kernels against each other on large gate pre-activations (i~ up to +-30, where exp(i~) without the
    stabiliser loses digits), the parallel form included; a state held at another stabiliser m + delta (C', n'
    scaled by exp(-delta)) is the same state: the same outputs after it."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 29, 4, generator=g, dtype=torch.float64) for _ in range(3))
    pre = torch.randn(2, 3, 29, generator=g, dtype=torch.float64) * 3
    logf = pre if forget == "exp" else F.logsigmoid(pre)
    ig = torch.randn(2, 3, 29, generator=g, dtype=torch.float64) * 10
    want, (Cs, ns, ms) = recurrent_mlstm(q, k, v, logf, ig)
    for C in (1, 4, 7, 64):
        got, _ = chunked_mlstm(q, k, v, logf, ig, None, C)
        assert (got - want).abs().max() < 1e-10 * want.abs().max()
    assert (parallel_mlstm(q, k, v, logf, ig) - want).abs().max() < 1e-10 * want.abs().max()
    after, _ = chunked_mlstm(q, k, v, logf, ig, (Cs, ns, ms), 5)
    delta = torch.randn(2, 3, generator=g, dtype=torch.float64) * 5
    shifted, _ = chunked_mlstm(q, k, v, logf, ig, (Cs * (-delta).exp()[..., None, None], ns * (-delta).exp()[..., None],
                                                   ms + delta), 5)
    assert (shifted - after).abs().max() < 1e-10 * after.abs().max()


def test_no_leak_and_a_constant_decoding_state():
    """The state: the convolution's window and per head C' [dh, dh], n' [dh], m: the cost's kv_cache, the same after
    5 tokens and after 40."""
    from costhelpers import declared

    m, _, _ = make_op("rnn", "mlstm", d=D, causal=True, heads=2, chunk=4)
    perturb_params(m)
    with torch.no_grad():
        assert_no_leak(lambda t: m(t, Ctx()), n=20, d=D)
        x = torch.randn(2, 40, D, dtype=torch.float64)
        for t in (5, 40):
            _, state = decode_in_pieces(m, x[:, :t], (1,) * t)
            _, _, cost, ev = declared("rnn", "mlstm", 2, t, dtype=torch.float64, d=D, causal=True, heads=2)
            assert state.nbytes() == ev(cost.cache) == 2 * (32 * 3 + 2 * (16 * 16 + 16 + 1)) * 8


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_enters_neither_state_nor_convolution(side):
    m, _, _ = make_op("rnn", "mlstm", d=D, causal=True, heads=2, chunk=4)
    perturb_params(m)
    assert_padded_row_alone(m, side, d=D)


def test_the_default_init_is_xlstm_s():
    m, _, _ = make_op("rnn", "mlstm", d=32, causal=True, heads=4, dtype=torch.float32)
    assert torch.equal(m.fgate.bias, torch.linspace(3.0, 6.0, 4)) and m.fgate.weight.abs().sum() == 0
    assert torch.equal(m.skip, torch.ones(64)) and m.E == 64 and m.dh == 16


def test_validation():
    base = ("vocab = 50\nd_model = 32\nmodel m(causal={c}) = input(tokens) -> embed(token) -> norm -> "
            "rnn(mlstm{a}) -> norm -> head(lm)\n")
    evodsl.parse(base.format(c="true", a=", heads=4, forget=exp"))
    with pytest.raises(EvoError, match="causal only"):
        evodsl.parse(base.format(c="false", a=""))
    with pytest.raises(EvoError, match="not divisible"):
        evodsl.parse(base.format(c="true", a=", heads=5"))
    for bad in ("forget=tanh", "heads=0", "expand=0", "conv=0", "chunk=0"):
        with pytest.raises(EvoError, match=bad.split("=")[0]):
            evodsl.parse(base.format(c="true", a=", " + bad))
