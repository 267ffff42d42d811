"""CoLT5's router (Ainslie et al. 2023, its routing function), shared by ffn(colt5) and mha(colt5).

Scores s_i = x_i . u (u in R^d, learned, no bias). The soft top-k is the entropy-regularised selection of k
tokens out of n that CoLT5 takes from Qian et al. 2022 (solved there by Wright's coordinate descent):

    lambda = argmax_{0 <= l_i <= 1, sum_i l_i = k}  s . l - eps sum_i l_i log l_i

whose KKT conditions give lambda_i = min(1, exp((s_i - tau) / eps)) for the one threshold tau at which the
lambdas sum to k. We solve for tau directly (instead of the coordinate descent's fixed point):
1. bisection on tau, without autograd: f(tau) = sum_i min(1, exp((s_i - tau)/eps)) falls from n at
   tau = min s to at most k at tau = max s + eps log(n/k); ROUTER_ITERS = 60 halvings shrink that bracket
   2^60-fold (below tau's ulp in float32, a few ulps in float64), so the saturated set S = {i : s_i >= tau} is
   exact but for scores within that of tau (then lambda_i ~ 1 either way);
2. given S (m = |S| tokens at 1), tau in closed form, differentiable in s (the implicit gradient, exactly):
   lambda_i = (k - m) exp(s_i / eps) / sum_{j not in S} exp(s_j / eps) for i not in S, 1 in S.
   k and m are integers, so k - m >= 1 unless the other tokens underflow to 0 (then they get 0).
The hard top-k: the k tokens of largest s (the largest lambdas, lambda being monotone in s) run the heavy branch
(a stable sort of s, cut at k: equal scores go to the earlier position, so the choice is deterministic; the
export's TopK breaks ties the same way). k is clipped at n (n <= k: every token is routed). CoLT5 (as lucidrains'
code) ranks by the soft scores; ranking by s gives the same set, lambda being monotone in s, without its ties
at lambda = 1. Gradients reach u through lambda only (the hard selection is discrete).

Padding (mask, False = padding): padded tokens get lambda = 0 and the lowest scores, so a row with t tokens
routes min(k, t) of them with the soft top-k of its t tokens alone (k clipped at t); where t < k the hard
selection fills up with padded positions, at weight 0 (and, in attention, masked as keys): their rows are read
(finite, as every op keeps padded positions) but reach no token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ROUTER_ITERS = 60  # bisection steps for the threshold tau
FILL = -1e4  # a z = (s - tau_hi) / eps out of the free set; the free set's largest z is >= -log(n)


class Router(nn.Module):
    """s = x u; soft top-k lambda [b, n]; hard top-k indices [b, K] (K = min(k, n))."""

    def __init__(self, d: int, k: int, eps: float):
        super().__init__()
        self.u = nn.Parameter(torch.randn(d, 1) / d ** 0.5)  # [d, 1]: x u is a matmul (counted as one)
        self.k, self.eps = k, eps

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """x [b, n, d] -> (idx [b, K] the routed positions, lam [b, K] their lambdas, slots: None, or bool [b, K]
        which slots are positions). K = min(k, n) at a known n; for a symbolic n (export) K = k always: the slots
        past n point at token n - 1 with lambda 0 (their heavy result, finite, is scaled to 0), so that no axis
        has a size that depends on whether n < k."""
        s = (x @ self.u).squeeze(-1)  # [b, n]
        lam = soft_top_k(s, self.k, self.eps, mask)
        ranked = s.detach() if mask is None else s.detach().masked_fill(~mask, float("-inf"))
        n = s.shape[1]
        if isinstance(n, int):  # a stable sort cut at k: equal scores, the earlier position first
            idx = ranked.sort(dim=-1, descending=True, stable=True).indices[:, :self.k]  # [b, K]
        else:  # export: k slots whatever n, topk over n + k scores (ONNX TopK, too, puts the earlier one first)
            idx = F.pad(ranked, (0, self.k), value=float("-inf")).topk(self.k, dim=-1).indices
            lam = F.pad(lam, (0, self.k))
        lam = lam.gather(1, idx)
        if isinstance(n, int):
            return idx, lam, None
        return idx.clamp(max=n - 1), lam, idx < n


def soft_top_k(s: torch.Tensor, k: int, eps: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """lambda [b, n] of scores s [b, n] (see the module docstring); mask bool [b, n], False = padding."""
    n = s.shape[-1]
    if mask is None:
        real = torch.full_like(s[:, :1], n)
        keep = None
    else:
        real = mask.sum(-1, keepdim=True).to(s.dtype)
        keep = mask
    kk = real.clamp(max=k)  # k clipped at the tokens of the row
    every = real <= k  # every token routed: lambda = 1
    with torch.no_grad():
        sd = s.detach()
        if keep is not None:
            lo = sd.masked_fill(~keep, float("inf")).amin(-1, keepdim=True)
            sd = sd.masked_fill(~keep, float("-inf"))
        else:
            lo = sd.amin(-1, keepdim=True)
        hi = sd.amax(-1, keepdim=True) + eps * torch.log(real.clamp(min=1) / kk.clamp(min=1))
        for _ in range(ROUTER_ITERS):
            mid = (lo + hi) / 2
            big = ((sd - mid) / eps).exp().clamp(max=1).sum(-1, keepdim=True) > kk
            lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
        sat = sd >= hi  # f(hi) <= k: these are at 1
        if keep is not None:
            sat = sat & keep
            sat = (every & keep) | (~every & sat)  # no bool Where: onnxruntime has none
        else:
            sat = sat | every
        rest = kk - sat.sum(-1, keepdim=True).to(s.dtype)  # k - m: >= 1, or 0
        out = sat if keep is None else sat | ~keep
    z = ((s - hi) / eps).masked_fill(out, FILL)
    free = (z - z.logsumexp(-1, keepdim=True) + rest.log()).exp()
    lam = torch.where(sat, torch.ones_like(s), free)
    return lam if keep is None else lam.masked_fill(~keep, 0.0)
