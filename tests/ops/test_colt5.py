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
    if k >= n:
        return s * 0 + 1
    srt = s.sort(descending=True).values
    for m in range(k):
        tau = eps * (torch.logsumexp(srt[m:] / eps, 0) - math.log(k - m))
        if (m == 0 or srt[m - 1] >= tau) and srt[m] <= tau + 1e-12 * (1 + abs(tau)):  # rounding: eps (s/eps) may fall under s
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
    u = m.router.u
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
                every[r] = mlp(x[r], m.light_up, m.light_down, ACTS[act]) + mlp(x[r], m.heavy_up, m.heavy_down, ACTS[act])
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


def test_ffn_router_learns():
    """Gradients reach the router's u through lambda, and every weight."""
    m, _, _ = make_op("ffn", "colt5", d=D, k=5)
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
