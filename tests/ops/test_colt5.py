"""ffn(colt5) and mha(colt5) against CoLT5's equations (Ainslie et al. 2023), in float64.

The soft top-k is checked against an independent solution of its KKT conditions: scores sorted, for each
candidate number m of saturated tokens the threshold tau_m = eps (logsumexp_{i >= m} s_(i)/eps - log(k - m)),
the one with s_(m-1) >= tau_m > s_(m) taken; lambda_i = min(1, exp((s_i - tau)/eps)). Its gradient is checked
against autograd through that reference. The ops are checked against loops over tokens written from the
equations (the routed set: the k largest scores), GQA, n below k (every token routed), n not a multiple of the
light window, padding (each row alone)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import evodsl
from evodsl import EvoError
from evodsl.ops import Ctx
from ophelpers import make_op, perturb_params

D = 32


def reference_soft_top_k(s: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """s [n] -> lambda [n], from the KKT conditions by sorting (k >= n: all ones)."""
    n = s.shape[0]
    if k == 0:
        return s * 0
    if k >= n:
        return s * 0 + 1
    srt = s.sort(descending=True).values
    for m in range(k):
        tau = eps * (torch.logsumexp(srt[m:] / eps, 0) - math.log(k - m))
        # (rounding: eps (s / eps) may fall just under s)
        if (m == 0 or srt[m - 1] >= tau) and srt[m] <= tau + 1e-12 * (1 + abs(tau)):
            return torch.clamp((s - tau) / eps, max=0.0).exp()
    raise AssertionError("no threshold found")


def routed_set(s: torch.Tensor, k: int) -> list[int]:
    return sorted(s.argsort(descending=True)[:k].tolist())


def mlp(x, up, down, act):
    return act(x @ up.weight.T + (0 if up.bias is None else up.bias)) @ down.weight.T + (
        0 if down.bias is None else down.bias)


ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh")}


def ffn_reference(m, x, k, eps, act, lengths=None):
    """Per row: y_i = light(x_i) + [i routed] lambda_i heavy(x_i), on the row's first `lengths[r]` tokens."""
    b, n, _ = x.shape
    y = torch.zeros_like(x)
    u = m.router.u[:, 0]  # the router's weight [d, 1]
    for r in range(b):
        t = n if lengths is None else lengths[r]
        xr = x[r, :t]
        s = xr @ u
        lam = reference_soft_top_k(s, min(k, t), eps)
        y[r, :t] = mlp(xr, m.light_up, m.light_down, ACTS[act])
        for i in routed_set(s, min(k, t)):
            y[r, i] += lam[i] * mlp(xr[i], m.heavy_up, m.heavy_down, ACTS[act])
    return y


@pytest.mark.parametrize("n, k, eps", [(13, 4, 0.1), (40, 7, 1.0), (9, 9, 0.3), (5, 16, 0.1), (64, 1, 0.05),
                                       (33, 20, 2.0)])
def test_soft_top_k_solves_its_kkt_conditions(n, k, eps):
    from evodsl.ops.ffn._colt5_router import soft_top_k

    g = torch.Generator().manual_seed(n * 31 + k)
    s = torch.randn(3, n, generator=g, dtype=torch.float64) * 2
    lam = soft_top_k(s, k, eps)
    for r in range(3):
        ref = reference_soft_top_k(s[r], k, eps)
        assert (lam[r] - ref).abs().max().item() < 1e-10
        assert abs(lam[r].sum().item() - min(k, n)) < 1e-9
    # the gradient through lambda, against autograd through the reference
    w = torch.randn(3, n, generator=g, dtype=torch.float64)
    s1 = s.clone().requires_grad_()
    (soft_top_k(s1, k, eps) * w).sum().backward()
    s2 = s.clone().requires_grad_()
    sum((reference_soft_top_k(s2[r], k, eps) * w[r]).sum() for r in range(3)).backward()
    assert (s1.grad - s2.grad).abs().max().item() < 1e-9
    if k < n:
        assert s1.grad.abs().max().item() > 1e-6  # gradients reach the scores


@pytest.mark.parametrize("n, k, eps, act, kw", [
    (13, 4, 0.1, "relu", {}), (40, 7, 1.0, "gelu", {"light": 8, "heavy": 48}), (5, 16, 0.1, "silu", {}),
    (27, 27, 0.5, "gelu_tanh", {"bias": False}), (50, 1, 0.05, "relu", {"light": 3, "heavy": 7}),
])
def test_ffn_matches_the_equation(n, k, eps, act, kw):
    m, _, _ = make_op("ffn", "colt5", d=D, k=k, eps=eps, act=act, **kw)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        ref = ffn_reference(m, x, k, eps, act)
        assert (y - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        if k < n:  # the control: the heavy branch on every token differs
            every = ref.clone()
            for r in range(2):
                every[r] = (mlp(x[r], m.light_up, m.light_down, ACTS[act])
                            + mlp(x[r], m.heavy_up, m.heavy_down, ACTS[act]))
            assert (y - every).abs().max().item() > 1e-6


def test_ffn_padding_is_each_row_alone():
    """Right and left padding: the tokens' outputs are the row's alone (k clipped at its tokens)."""
    n, lengths = 30, [30, 17, 4, 1]
    m, _, _ = make_op("ffn", "colt5", d=D, k=6, eps=0.2)
    perturb_params(m)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(len(lengths), n, D, generator=g, dtype=torch.float64)
    for left in (False, True):
        mask = torch.zeros(len(lengths), n, dtype=torch.bool)
        for r, t in enumerate(lengths):
            if left:
                mask[r, n - t:] = True
            else:
                mask[r, :t] = True
        with torch.no_grad():
            y = m(x, Ctx(mask=mask))
            for r, t in enumerate(lengths):
                alone = m(x[r:r + 1][:, mask[r]], Ctx())
                assert (y[r][mask[r]] - alone[0]).abs().max().item() < 1e-10
                ref = ffn_reference(m, x[r:r + 1][:, mask[r]], 6, 0.2, "relu")
                assert (alone - ref).abs().max().item() < 1e-10


@pytest.mark.parametrize("family, build", [("ffn", {"k": 5}), ("mha", {"heads": 4, "window": 3, "k_q": 5, "k_kv": 6})])
def test_routers_learn(family, build):
    """Gradients reach the routers' u through lambda, every weight, and the input."""
    m, _, _ = make_op(family, "colt5", d=D, **build)
    perturb_params(m)
    m.train()
    x = torch.randn(2, 20, D, dtype=torch.float64, requires_grad=True)
    m(x, Ctx()).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().max().item() > 0, name
    assert x.grad.abs().max().item() > 0


def test_ffn_validation():
    with pytest.raises(EvoError, match="E301"):
        evodsl.parse("d_model = 32\nmodel m(causal=true) = input(tokens, vocab=11) -> embed(token) -> "
                     "ffn(colt5, k=4) -> head(lm)\n")
    with pytest.raises(EvoError, match="k"):
        evodsl.parse("d_model = 32\nmodel m = input(tokens, vocab=11) -> embed(token) -> ffn(colt5, k=0) -> head(lm)\n")
    with pytest.raises(EvoError, match="eps"):
        evodsl.parse("d_model = 32\nmodel m = input(tokens, vocab=11) -> embed(token) -> ffn(colt5, eps=0.0) -> "
                     "head(lm)\n")
    with pytest.raises(EvoError, match="E300.*ffn\\(colt5\\) routes tokens of a sequence"):
        evodsl.parse("d_model = 32\nmodel m = input(tokens, vocab=11) -> embed(token) -> head(pooler) -> ffn(colt5)\n")


# ---------------------------------------------------------------- mha(colt5)


def lin(layer, x):
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def attend(q, ks, vs):
    """One query head q [dh] over keys ks [m, dh], values vs [m, dh]: softmax(q k / sqrt(dh)) v."""
    w = torch.softmax(ks @ q / math.sqrt(q.shape[0]), 0)
    return torch.einsum("j,jd->d", w, vs)


def mha_reference(m, x, k_q, k_kv, eps, window, light=True):
    """One row x [t, d] (its tokens only): the light band plus the lambda^q-scaled heavy attention."""
    t, d = x.shape
    lm = m.light
    hl, dh = lm.heads, lm.head_dim
    y = torch.zeros_like(x)
    if light:
        q, k, v = (lin(layer, x).view(t, -1, dh) for layer in (lm.q_proj, lm.k_proj, lm.v_proj))
        o = torch.zeros(t, hl, dh, dtype=x.dtype)
        for i in range(t):
            keys = [j for j in range(t) if abs(i - j) < window]
            for hh in range(hl):
                o[i, hh] = attend(q[i, hh], k[keys, hh], v[keys, hh])
        y = lin(lm.o_proj, o.reshape(t, hl * dh))
    sq, skv = x @ m.q_router.u[:, 0], x @ m.kv_router.u[:, 0]
    lq, lkv = reference_soft_top_k(sq, min(k_q, t), eps), reference_soft_top_k(skv, min(k_kv, t), eps)
    Q, KV = routed_set(sq, min(k_q, t)), routed_set(skv, min(k_kv, t))
    h, g = m.heads, m.heads // m.kv_heads
    xs = lkv[KV, None] * x[KV]  # the routed tokens scaled by their lambdas
    kk, vv = lin(m.k_proj, xs).view(len(KV), m.kv_heads, dh), lin(m.v_proj, xs).view(len(KV), m.kv_heads, dh)
    for i in Q:
        qi = lin(m.q_proj, x[i]).view(h, dh)
        o = torch.stack([attend(qi[hh], kk[:, hh // g], vv[:, hh // g]) for hh in range(h)])
        y[i] += lq[i] * lin(m.o_proj, o.reshape(h * dh))
    return y


MHA_CASES = [  # n, k_q, k_kv, eps, window, heads, kv_heads, light_heads
    (19, 5, 7, 0.1, 3, 4, None, None), (40, 9, 6, 1.0, 5, 4, 2, 1), (11, 16, 16, 0.3, 4, 4, 1, 3),
    (33, 1, 20, 0.05, 40, 2, None, 2), (70, 12, 3, 0.5, 6, 4, 2, None),
]


@pytest.mark.parametrize("n, k_q, k_kv, eps, window, heads, kv_heads, light_heads", MHA_CASES)
def test_mha_matches_the_equation(n, k_q, k_kv, eps, window, heads, kv_heads, light_heads):
    m, _, _ = make_op("mha", "colt5", d=D, heads=heads, kv_heads=kv_heads, light_heads=light_heads, window=window,
                      k_q=k_q, k_kv=k_kv, eps=eps)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        for r in range(2):
            ref = mha_reference(m, x[r], k_q, k_kv, eps, window)
            assert (y[r] - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
        # the control: the light band alone differs wherever a query is routed
        assert (y[0] - mha_reference(m, x[0], 0, k_kv, eps, window)).abs().max().item() > 1e-6


def test_mha_every_token_routed_is_softmax_attention():
    """n <= k_q, k_kv: every lambda is 1 and the heavy branch is exactly softmax attention over the sequence
    (an exact check against mha(softmax)'s equation, tolerance 1e-10 on outputs of order 1)."""
    n = 12
    m, _, _ = make_op("mha", "colt5", d=D, heads=4, kv_heads=2, window=3, k_q=16, k_kv=12)
    perturb_params(m)
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        y = m(x, Ctx())
        for r in range(2):
            q = lin(m.q_proj, x[r]).view(n, 4, -1)
            k, v = lin(m.k_proj, x[r]).view(n, 2, -1), lin(m.v_proj, x[r]).view(n, 2, -1)
            o = torch.stack([torch.stack([attend(q[i, hh], k[:, hh // 2], v[:, hh // 2]) for hh in range(4)])
                             for i in range(n)])
            full = lin(m.o_proj, o.reshape(n, -1))
            light = mha_reference(m, x[r], 0, 0, 0.1, 3)  # the band alone: no routed query
            assert (y[r] - (light + full)).abs().max().item() < 1e-10
            assert full.abs().max().item() > 1e-2


def test_mha_padding_is_each_row_alone():
    n, lengths = 30, [30, 17, 4, 1]
    m, _, _ = make_op("mha", "colt5", d=D, heads=4, kv_heads=2, window=4, k_q=6, k_kv=9, eps=0.2)
    perturb_params(m)
    x = torch.randn(len(lengths), n, D, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        y = m(x, Ctx(mask=mask))
        for r, t in enumerate(lengths):
            ref = mha_reference(m, x[r, :t], 6, 9, 0.2, 4)
            assert (y[r, :t] - ref).abs().max().item() < 1e-10


def test_mha_validation():
    with pytest.raises(EvoError, match="E301"):
        evodsl.parse("d_model = 32\nmodel m(causal=true) = input(tokens, vocab=11) -> embed(token) -> "
                     "mha(colt5, k_q=4, k_kv=4) -> head(lm)\n")
    with pytest.raises(EvoError, match="dropout"):
        evodsl.parse("d_model = 32\nmodel m = input(tokens, vocab=11) -> embed(token) -> mha(colt5, dropout=0.1) "
                     "-> head(lm)\n")
    with pytest.raises(EvoError, match="E302"):
        evodsl.parse("d_model = 32\nmodel m = input(tokens, vocab=11) -> embed(token) -> pos(rope) -> mha(colt5) "
                     "-> head(lm)\n")
    with pytest.raises(EvoError, match="k_kv"):
        evodsl.parse("d_model = 32\nmodel m = input(tokens, vocab=11) -> embed(token) -> mha(colt5, k_kv=0) "
                     "-> head(lm)\n")


def test_ffn_grows_as_declared():
    """ffn(colt5) with a fixed k: the light MLP linear in n, the heavy one constant; FLOPs, the inference peak and
    the backward, measured at n = 1k..8k (tests/growth.py), against the declared cost's classes."""
    from costhelpers import declared
    from growth import check_growth, declared_growth, measure_growth

    d, args = 64, {"k": 64, "light": 32, "heavy": 256}
    module = declared("ffn", "colt5", 1, 1024, dtype=torch.float32, d=d, **args)[0].train()
    got = measure_growth(lambda x: module(x, Ctx()),
                         lambda n: torch.randn(1, n, d, generator=torch.Generator().manual_seed(n)),
                         exclude=[module], train=True)

    def at(n):
        _, _, cost, ev = declared("ffn", "colt5", 1, n, dtype=torch.float32, d=d, **args)
        return ev(cost.fwd), ev(cost.peak) + n * d * 4, ev(cost.bwd)

    flops, peak, bwd = declared_growth(at)
    check_growth("ffn(colt5)", got, flops, peak, bwd)


class _Masked(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x, mask):
        return self.m(x, Ctx(mask=mask.bool()))


@pytest.mark.parametrize("family, build", [
    ("ffn", {"k": 9, "eps": 0.3}), ("ffn", {"k": 1, "act": "gelu"}),
    ("mha", {"heads": 4, "kv_heads": 2, "window": 3, "k_q": 9, "k_kv": 12}),
    ("mha", {"heads": 4, "kv_heads": 1, "window": 5, "k_q": 3, "k_kv": 20, "light_heads": 1}),
])
def test_export_form_equals_forward(family, build):
    """The form torch.export traces (a symbolic n: k slots whatever n, those past n at weight 0 and masked as
    keys) equals the eager forward at n below, at and above k, with right padding."""
    m, _, _ = make_op(family, "colt5", d=D, **build)
    perturb_params(m)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 20, D, generator=g, dtype=torch.float64)
    n = torch.export.Dim("n", min=2, max=256)
    ep = torch.export.export(_Masked(m), (x0, torch.ones(2, 20, dtype=torch.long)),
                             dynamic_shapes=({1: n}, {1: n})).module()
    for length in (2, 5, 9, 12, 31):
        x = torch.randn(2, length, D, generator=g, dtype=torch.float64)
        for lengths in ((length, length), (length, max(1, length // 2))):
            mask = (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()
            with torch.no_grad():
                want = m(x, Ctx(mask=mask.bool()))
                got = ep(x, mask)
            keep = mask.bool()
            assert (got[keep] - want[keep]).abs().max().item() < 1e-10, (length, lengths)
