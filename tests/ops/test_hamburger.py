"""mixer(hamburger) against the paper's update equations, in float64 and in the paper's orientation (X [e, n],
D [e, r], C [r, n], one sequence at a time): NMF's multiplicative updates and soft VQ's assignment and centres, K
steps from the fixed init (the op's buffer, part of its declaration); the one-step gradient (the backward equals
that of the last step alone, its D and C constants); padding (test_padding-style, here: the op is a mixer); the
refusals (a causal model, temperature= on NMF, bad params)."""
from __future__ import annotations

import pytest
import torch

from evodsl import EvoError, parse
from evodsl.ops import Ctx
from ophelpers import make_op, perturb_params

D = 24
EPS = 1e-6


def bread(layer, t):
    return t @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def ham_input(m, x, kind):
    """X [b, e, n]: the lower bread, relu'd for NMF."""
    h = bread(m.lower, x)
    return (h.clamp(min=0) if kind == "nmf" else h).transpose(1, 2)


def nmf_update(X, Dm, C):
    """Lee-Seung: C <- C (D^T X) / (D^T D C), then D <- D (X C^T) / (D C C^T), with the new C."""
    C = C * (Dm.T @ X) / (Dm.T @ Dm @ C + EPS)
    Dm = Dm * (X @ C.T) / (Dm @ C @ C.T + EPS)
    return Dm, C


def vq_update(X, Dm, T):
    """C <- softmax_r(cos(D, X) / T) (over the r centres, per column), D <- X C^T diag(C 1_n)^-1."""
    e, n = X.shape
    r = Dm.shape[1]
    cos = [[None] * n for _ in range(r)]
    for i in range(r):
        for j in range(n):
            cos[i][j] = (Dm[:, i] @ X[:, j]) / (Dm[:, i].norm().clamp(min=EPS) * X[:, j].norm().clamp(min=EPS))
    C = torch.exp(torch.stack([torch.stack(row) for row in cos]) / T)
    C = C / C.sum(0, keepdim=True)
    return X @ C.T / (C.sum(1) + EPS), C


def decompose(X, D0, kind, K, T=0.1):
    """(D, C) after K steps on one sequence's X [e, n], and (D, C) after K - 1 (the last step's inputs)."""
    Dm, C = D0.clone(), None
    if kind == "nmf":
        logits = (D0.T @ X)
        C = torch.exp(logits - logits.max(0).values) / torch.exp(logits - logits.max(0).values).sum(0)
    before = None
    for _ in range(K):
        before = (Dm, C)
        Dm, C = nmf_update(X, Dm, C) if kind == "nmf" else vq_update(X, Dm, T)
    return (Dm, C), before


def reference(m, x, kind, K, T=0.1):
    X = ham_input(m, x, kind)
    out = []
    for i in range(x.shape[0]):
        (Dm, C), _ = decompose(X[i], m.bases, kind, K, T)
        out.append((Dm @ C).T)
    return bread(m.upper, torch.stack(out))


CASES = [  # kind, K, r, n, d_ham
    ("nmf", 1, 4, 9, None), ("nmf", 3, 4, 13, None), ("nmf", 6, 8, 5, 16), ("nmf", 2, 1, 7, None),
    ("nmf", 4, 6, 1, None),  # one token
    ("vq", 1, 4, 9, None), ("vq", 3, 3, 13, 16), ("vq", 5, 8, 4, None), ("vq", 2, 2, 1, None),
]


@pytest.mark.parametrize("kind,K,r,n,d_ham", CASES)
def test_hamburger_matches_the_update_equations(kind, K, r, n, d_ham):
    m, _, _ = make_op("mixer", "hamburger", d=D, r=r, steps=K, kind=kind, d_ham=d_ham)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y, ref = m(x, Ctx()), reference(m, x, kind, K)
    assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
    if K > 1 and n > 1:  # the steps matter: one step fewer is another output (one column is fitted at once)
        with torch.no_grad():
            assert (y - reference(m, x, kind, K - 1)).abs().max().item() > 1e-6


def test_vq_temperature():
    m, _, _ = make_op("mixer", "hamburger", d=D, r=4, steps=3, kind="vq", temperature=0.7)
    perturb_params(m)
    x = torch.randn(2, 11, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        assert (y - reference(m, x, "vq", 3, T=0.7)).abs().max().item() < 1e-10 * y.abs().max().item()
        assert (y - reference(m, x, "vq", 3, T=0.1)).abs().max().item() > 1e-6


@pytest.mark.parametrize("kind,K", [("nmf", 1), ("nmf", 4), ("vq", 1), ("vq", 3)])
def test_one_step_gradient(kind, K):
    """The input's gradient is that of the last step alone: D and C of step K - 1 (from the reference) held
    constant, X -> last update -> D C -> upper bread; the full unrolled gradient differs (K > 1)."""
    m, _, _ = make_op("mixer", "hamburger", d=D, r=4, steps=K, kind=kind)
    perturb_params(m)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 9, D, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad((m(x, Ctx()) * w).sum(), x)

    def last_step(x, unrolled=False):
        X = ham_input(m, x, kind)
        out = []
        for i in range(x.shape[0]):
            if unrolled:
                (Dm, C), _ = decompose(X[i], m.bases, kind, K)
            else:
                _, (D1, C1) = decompose(X[i].detach(), m.bases, kind, K)
                Dm, C = nmf_update(X[i], D1, C1) if kind == "nmf" else vq_update(X[i], D1, 0.1)
            out.append((Dm @ C).T)
        return bread(m.upper, torch.stack(out))

    (want,) = torch.autograd.grad((last_step(x) * w).sum(), x)
    assert (gx - want).abs().max().item() < 1e-9 * want.abs().max().item()
    if K > 1:
        (full,) = torch.autograd.grad((last_step(x, unrolled=True) * w).sum(), x)
        assert (gx - full).abs().max().item() > 1e-6 * full.abs().max().item()


@pytest.mark.parametrize("kind", ["nmf", "vq"])
def test_padding_is_left_out(kind):
    """Left and right padding: each sequence's outputs are those it gives alone (padded columns reach no D)."""
    m, _, _ = make_op("mixer", "hamburger", d=D, r=4, steps=3, kind=kind)
    perturb_params(m)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 10, D, generator=g, dtype=torch.float64)
    mask = torch.arange(10)[None, :] < torch.tensor([10, 6, 2])[:, None]
    mask[2] = mask[2].flip(0)
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        for i in range(3):
            alone = m(x[i:i + 1, mask[i]], Ctx())[0]
            assert (y[i, mask[i]] - alone).abs().max().item() < 1e-10 * alone.abs().max().item()
        assert (m(x, Ctx())[1, mask[1]] - y[1, mask[1]]).abs().max().item() > 1e-6  # the control


def test_refusals():
    head = "d_model = 32\nmodel m{} = input(tokens, vocab=11) -> embed(token) -> mixer(hamburger{})"
    with pytest.raises(EvoError, match="mixer\\(hamburger\\) has no causal form"):
        parse(head.format("(causal=true)", ", r=4"))
    with pytest.raises(EvoError, match="temperature= is the soft assignment's"):
        parse(head.format("", ", r=4, temperature=0.5"))
    for bad in (", r=0", ", steps=0", ", kind=svd", ", temperature=0.0, kind=vq"):
        with pytest.raises(EvoError):
            parse(head.format("", bad))
    parse(head.format("", ", r=4, steps=2, kind=vq, temperature=0.5, d_ham=16, bias=false"))
