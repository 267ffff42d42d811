"""mha(sparse_sinkhorn) against its defining equation, in float64: block sums (causal: the mean of the past blocks'
sums), R = relu(W_B relu(W_P s + b_P) + b_B) from the weights, Sinkhorn's iterations written as plain divisions by
row and column sums in loops (causal: rows over the past blocks, columns over the rows so far), the sorted K and V
blocks as S-weighted sums of the zero-padded blocks, then per query one softmax over its sorted block and its own
block (causal: the own block up to the query, block 0 without a sorted block). Gumbel noise in training is drawn
from torch's seeded generator and replayed here; eval is deterministic."""
from __future__ import annotations

import math

import pytest
import torch

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from evodsl.ops.attention._sparse_sinkhorn_sort import causal_sinkhorn_log, masked_sinkhorn_log
from ophelpers import assert_no_leak, head_projections, make_op, output_projection, perturb_params

D, MAX = 32, 64


def sinkhorn_loops(P: torch.Tensor, iters: int, causal: bool) -> torch.Tensor:
    """P [m, m] positive (causal: used where j < i) -> S after `iters` (rows, then columns) normalisations."""
    m = P.shape[0]
    S = P.clone()
    if causal:
        S = torch.stack([torch.stack([S[i, j] if j < i else S.new_zeros(()) for j in range(m)]) for i in range(m)])
    for _ in range(iters):
        R = S.clone()
        for i in range(m):
            tot = sum(S[i, j] for j in range(m) if not causal or j < i)
            for j in range(m):
                if not causal or j < i:
                    R[i, j] = S[i, j] / tot
        S = R.clone()
        for i in range(m):
            for j in range(m):
                if not causal or j < i:
                    S[i, j] = R[i, j] / sum(R[k, j] for k in range(m) if (not causal or k <= i))
    return S


def reference(m, x, B, iters, tau, causal, noise=None):
    q, k, v = head_projections(m, x)  # [b, n, h, dh], [b, n, kv, dh]
    b, n, h, dh = q.shape
    kv = k.shape[2]
    g, mb = h // kv, -(-n // B)
    kp, vp = (torch.zeros(b, mb * B, kv, dh, dtype=x.dtype) for _ in range(2))
    kp[:, :n], vp[:, :n] = k, v
    sums = torch.stack([x[:, i * B:(i + 1) * B].sum(1) for i in range(mb)], 1)  # [b, mb, d]
    if causal:
        sums = torch.stack([sums[:, :i].sum(1) / max(i, 1) for i in range(mb)], 1)
    sn = m.sort
    hid = torch.relu(sums @ sn.hidden.weight.T + (0 if sn.hidden.bias is None else sn.hidden.bias))
    R = torch.relu(hid @ sn.logits.weight.T + (0 if sn.logits.bias is None else sn.logits.bias))[:, :, :mb]
    if noise is not None:
        R = R + noise
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        S = sinkhorn_loops(torch.exp(R[bb] / tau), iters, causal)
        for t in range(n):
            i = t // B
            sk = sum(S[i, j] * kp[bb, j * B:(j + 1) * B] for j in range(mb))  # [B, kv, dh]
            sv = sum(S[i, j] * vp[bb, j * B:(j + 1) * B] for j in range(mb))
            last = t + 1 if causal else min(n, (i + 1) * B)
            keys, vals = k[bb, i * B:last], v[bb, i * B:last]
            if not (causal and i == 0):
                keys, vals = torch.cat((sk, keys)), torch.cat((sv, vals))
            for hh in range(h):
                w = (keys[:, hh // g] @ q[bb, t, hh] / math.sqrt(dh)).softmax(0)
                out[bb, t, hh] = w @ vals[:, hh // g]
    return output_projection(m, out.reshape(b, n, h * dh))


def _op(causal, B, kv_heads, iters, **extra):
    m, _, _ = make_op("mha", "sparse_sinkhorn", d=D, causal=causal, heads=4, kv_heads=kv_heads, block=B, max_len=MAX,
                      iters=iters, **extra)
    perturb_params(m)
    return m


CASES = [  # causal, B, n, kv_heads, iters
    (False, 4, 16, None, 5), (True, 4, 16, None, 5),  # B divides n
    (False, 4, 23, 2, 3), (True, 4, 23, 2, 3),  # a partial last block, grouped K/V heads
    (True, 3, 10, 1, 1), (False, 5, 12, 1, 2),
    (False, 8, 5, None, 2), (True, 8, 5, 2, 2),  # n < B: one block (causal: no sorted block)
    (False, 1, 6, None, 4), (True, 1, 6, None, 4),  # B = 1: token-level sorting
]


@pytest.mark.parametrize("causal, B, n, kv_heads, iters", CASES)
def test_sparse_sinkhorn_matches_equation(causal, B, n, kv_heads, iters):
    m = _op(causal, B, kv_heads, iters)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = reference(m, x, B, iters, 0.75, causal)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)


def test_gumbel_noise_in_training_only():
    """Training: (R + eps) / tau with eps = -log(-log U), U from torch's generator (the draw replayed here); eval: no
    noise, the same output on every call."""
    for causal in (False, True):
        m = _op(causal, 4, 2, 3, temperature=0.5)
        x = torch.randn(2, 19, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        with torch.no_grad():
            m.train()
            torch.manual_seed(11)
            y = m(x, Ctx())
            torch.manual_seed(11)
            u = torch.rand(2, 5, 5, dtype=torch.float64)
            ref = reference(m, x, 4, 3, 0.5, causal, noise=-(-u.log()).log())
            assert (y - ref).abs().max().item() < 1e-10 * ref.abs().max().item()
            m.eval()
            e = m(x, Ctx())
            assert torch.equal(e, m(x, Ctx())) and (e - y).abs().max().item() > 1e-6
            assert (e - reference(m, x, 4, 3, 0.5, causal)).abs().max().item() < 1e-10 * e.abs().max().item()


def test_sinkhorn_balancing():
    """Bidirectional: the log-space iterations equal the loops, and after 100 iterations S is doubly stochastic
    (rows within 1e-9, columns to rounding: a column step ends each iteration), while after 1 the rows are off by
    more than 0.01. Causal: equal to the loops, row 0 and the entries j >= i exactly 0, and row i unchanged when the
    logits of the later rows change."""
    g = torch.Generator().manual_seed(2)
    c = 2 * torch.randn(3, 7, 7, generator=g, dtype=torch.float64)
    S = masked_sinkhorn_log(c, 100, None).exp()
    assert (S.sum(-2) - 1).abs().max().item() < 1e-12 and (S.sum(-1) - 1).abs().max().item() < 1e-9
    assert (masked_sinkhorn_log(c, 1, None).exp().sum(-1) - 1).abs().max().item() > 1e-2
    for T in (1, 4):
        ref = torch.stack([sinkhorn_loops(c[i].exp(), T, False) for i in range(3)])
        assert (masked_sinkhorn_log(c, T, None).exp() - ref).abs().max().item() < 1e-12
        C = causal_sinkhorn_log(c, T).exp()
        ref = torch.stack([sinkhorn_loops(c[i].exp(), T, True) for i in range(3)])
        assert (C - ref).abs().max().item() < 1e-12
        assert (C * (torch.arange(7)[None, :] >= torch.arange(7)[:, None])).abs().max().item() == 0
        for i in range(6):
            c2 = c.clone()
            c2[:, i + 1:] = torch.randn(3, 6 - i, 7, generator=g, dtype=torch.float64) * 3
            assert torch.equal(causal_sinkhorn_log(c2, T)[:, :i + 1], causal_sinkhorn_log(c, T)[:, :i + 1])


def test_causal_does_not_leak_and_bidirectional_does():
    m = _op(True, 4, 2, 3)
    with torch.no_grad():
        assert_no_leak(lambda x: m(x, Ctx()), n=25, d=D)
    m = _op(False, 4, None, 3)
    with torch.no_grad(), pytest.raises(AssertionError, match="changed by"):
        assert_no_leak(lambda x: m(x, Ctx()), n=12, d=D)


@pytest.mark.parametrize("causal", [False, True])
def test_padding(causal):
    """Right padding equals each sequence alone (bidirectional: S balanced over the real blocks); left padding E409."""
    m = _op(causal, 4, 2, 3)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 18, D, generator=g, dtype=torch.float64)
    lengths = (18, 11, 4)
    mask = torch.arange(18)[None, :] < torch.tensor(lengths)[:, None]
    x[~mask] = 5 * torch.randn(int((~mask).sum()), D, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx(mask=mask, right_padded=True))
        for i, L in enumerate(lengths):
            alone = m(x[i:i + 1, :L], Ctx())
            assert (y[i, :L] - alone[0]).abs().max().item() < 1e-10 * alone.abs().max().item()
        with pytest.raises(EvoError, match="E409.*right padding"):
            m(x, Ctx(mask=mask.flip(1)))


@pytest.mark.parametrize("causal", [False, True])
def test_export_form_equals_forward(causal):
    """The form the export runs (a symbolic n: one block of padding past n, balanced with itself, the blocks gathered
    by index) equals the forward at every n, below B included, with GQA and right padding."""
    m = _op(causal, 4, 2, 3)
    for n in (1, 3, 5, 17):
        x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        mask = torch.arange(n)[None, :] < torch.tensor([[n], [max(1, n - 4)]])
        for key_mask in (None, mask):
            with torch.no_grad():
                want = m(x, Ctx(mask=key_mask, right_padded=True))
                got = m.o_proj(m.attend(x, key_mask, symbolic=True))
                real = mask[..., None] if key_mask is not None else 1
                assert ((got - want) * real).abs().max().item() < 1e-12, n


def test_refusals():
    src = ("d_model = 32\nmodel m(causal=true) = input(tokens, vocab=11) -> embed(token) -> "
           "mha(sparse_sinkhorn, block=4, max_len=64) -> head(lm)\n")
    evodsl.parse(src)
    evodsl.parse(src.replace("causal=true", "causal=false"))
    with pytest.raises(EvoError, match="E204.*block"):
        evodsl.parse(src.replace("block=4", "block=0"))
    with pytest.raises(EvoError, match="E204.*temperature"):
        evodsl.parse(src.replace("block=4", "block=4, temperature=0.0"))
    with pytest.raises(EvoError, match="dropout"):
        evodsl.parse(src.replace("block=4", "block=4, dropout=0.1"))
    m = _op(False, 4, None, 2)
    with pytest.raises(EvoError, match="E410.*max_len=64"):
        m(torch.randn(1, 65, D, dtype=torch.float64), Ctx())
