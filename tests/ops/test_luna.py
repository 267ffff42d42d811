"""mha(luna) against its defining equations, in float64: per head, pack A = softmax(P_q K^T / sqrt(dh)) over the
positions, unpack softmax(Q (A K)^T / sqrt(dh)) (A V), with explicit sums; padded keys get no pack weight (a
padded batch equals each sequence alone: here and in test_padding.py); no dropout."""
from __future__ import annotations

import math

import pytest
import torch

from evodsl.ops import Ctx, OpEnv, ShapeProblem, lookup
from ophelpers import head_projections, make_op, output_projection, perturb_params

D = 32


def _softmax(s):
    w = torch.exp(s - s.amax(-1, keepdim=True))
    return w / w.sum(-1, keepdim=True)


def reference_luna(m, x, keep=None):
    b, n, _ = x.shape
    h, g, dh = m.heads, m.kv_heads, m.head_dim
    q, k, v = head_projections(m, x)
    P = m.p_q.view(-1, h, dh)  # P's queries, learned
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for hh in range(h):
        kh = hh // (h // g)
        s = torch.einsum("rd,bjd->brj", P[:, hh], k[:, :, kh]) / math.sqrt(dh)
        if keep is not None:
            s = s.masked_fill(~keep[:, None, :], float("-inf"))
        A = _softmax(s)  # [b, L, n]
        kp = torch.einsum("brj,bjd->brd", A, k[:, :, kh])
        vp = torch.einsum("brj,bjd->brd", A, v[:, :, kh])
        w = _softmax(torch.einsum("bid,brd->bir", q[:, :, hh], kp) / math.sqrt(dh))
        out[:, :, hh] = torch.einsum("bir,brd->bid", w, vp)
    return output_projection(m, out.reshape(b, n, h * dh))


@pytest.mark.parametrize("n,L,kv_heads,bias", [(40, 8, None, True), (17, 32, 2, True), (9, 3, 1, False),
                                               (64, 16, 2, False)])
def test_luna_matches_equation(n, L, kv_heads, bias):
    m, _, _ = make_op("mha", "luna", d=D, heads=4, kv_heads=kv_heads, l=L, bias=bias)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference_luna(m, x)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        m.p_q[0, 0] += 1.0  # P is read
        assert (m(x, Ctx()) - y).abs().max().item() > 1e-6


def test_luna_padding_masks_the_pack():
    m, _, _ = make_op("mha", "luna", d=D, heads=4, kv_heads=2, l=6)
    perturb_params(m)
    x = torch.randn(2, 12, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[0, 7:] = False
    keep[1, :4] = False
    with torch.no_grad():
        y, ref = m(x, Ctx(mask=keep)), reference_luna(m, x, keep)
        assert (y - ref).abs().max().item() < 1e-10 * ref.abs().max().item()
        assert (y[1:, 4:] - m(x[1:, 4:], Ctx())).abs().max().item() < 1e-10 * ref.abs().max().item()


def test_luna_refuses_dropout():
    op = lookup("mha", "luna")
    with pytest.raises(ShapeProblem, match="no dropout"):
        op.shape(op.params(l=4, dropout=0.1), OpEnv(in_shapes=(("b", "n", D),)))


def reference_causal_luna(m, x, keep=None):
    """The paper's causal Luna, per head and position t with explicit prefix sums over j <= t."""
    b, n, _ = x.shape
    h, g, dh = m.heads, m.kv_heads, m.head_dim
    q, k, v = head_projections(m, x)
    P = m.p_q.view(-1, h, dh)
    act = {"elu1": lambda t: torch.nn.functional.elu(t) + 1, "softplus": torch.nn.functional.softplus}[m.act]
    out = torch.zeros(b, n, h, dh, dtype=x.dtype)
    for bb in range(b):
        for hh in range(h):
            kh = hh // (h // g)
            sk = torch.zeros(P.shape[0], dh, dtype=x.dtype)
            sv = torch.zeros(P.shape[0], dh, dtype=x.dtype)
            count = 0
            for t in range(n):
                if keep is None or keep[bb, t]:
                    a = act(P[:, hh] @ k[bb, t, kh] / math.sqrt(dh))  # [L]
                    sk, sv, count = sk + torch.outer(a, k[bb, t, kh]), sv + torch.outer(a, v[bb, t, kh]), count + 1
                c = max(count, 1)
                w = _softmax((sk / c) @ q[bb, t, hh] / math.sqrt(dh))
                out[bb, t, hh] = w @ (sv / c)
    return output_projection(m, out.reshape(b, n, h * dh))


# chunks of 4 (six, the last one short), 5 (four, short), 8 (four, whole), 64 (one), 1 (a chunk a token)
@pytest.mark.parametrize("n,L,kv_heads,act,chunk", [(23, 8, None, "elu1", 4), (17, 5, 2, "softplus", 5),
                                                    (32, 6, 2, "elu1", 8), (9, 3, 1, "elu1", 64),
                                                    (7, 4, None, "softplus", 1)])
def test_causal_luna_matches_equation(n, L, kv_heads, act, chunk):
    m, _, _ = make_op("mha", "luna", d=D, causal=True, heads=4, kv_heads=kv_heads, l=L, act=act, chunk=chunk)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference_causal_luna(m, x)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        keep = torch.ones(2, n, dtype=torch.bool)
        keep[1, :4] = False  # left padding: padded positions neither add to the sums nor count
        y, ref = m(x, Ctx(mask=keep)), reference_causal_luna(m, x, keep)
        assert (y[keep] - ref[keep]).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
