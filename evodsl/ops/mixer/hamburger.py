"""mixer(hamburger, r=R, steps=K, kind=nmf|vq): the Hamburger of Geng et al. 2021 (Is Attention Better Than Matrix
Decomposition?, arXiv:2109.04553): global context by a low-rank matrix decomposition in the place of attention.

For the layer's input x [n, d] (one sequence):

    X = lower(x)^T            [e, n]   the lower bread, a linear map d -> e (e = d_ham; NMF: relu'd, X >= 0)
    X~ = D C                  [e, n]   the ham: X ~ D C, D [e, r], C [r, n], by K steps of an optimization
    out = upper(X~^T)         [n, d]   the upper bread, a linear map e -> d

NMF with multiplicative updates (Lee & Seung), each step C first, then D with the new C:

    C <- C * (D^T X) / (D^T D C + eps),    D <- D * (X C^T) / (D C C^T + eps)

Soft VQ (soft k-means), each step the assignment, then the centres:

    C <- softmax_r(cos(D, X) / T),    D <- X C^T diag(C 1_n)^{-1}      (cos: the cosine of every column pair)

The one-step gradient (the paper's section 2.3): the first K - 1 steps run under torch.no_grad, the last one with
autograd, so the backward goes through the last step alone (its D and C inputs constants), O(n r e) whatever K.

Choices where the paper is silent or where its code differs:
- D's initialization: a fixed buffer drawn once from a seeded generator (seed 0; NMF uniform(0, 1), VQ normal),
  columns normalized to unit length, the same for every sequence and call (the official code draws it anew per
  call in training; a fixed draw keeps the op deterministic and the reference exact). No learned init: under the
  one-step gradient no gradient reaches it when K > 1.
- NMF's C init: softmax_r(D^T X) per position (the official code's), under no_grad; D^T X is the first step's
  numerator too, computed once. eps = 1e-6 in both updates;
  VQ: eps = 1e-6 in the column norms and the assignment counts; T defaults to 0.1 (cosines in [-1, 1]).
- NMF updates in the paper's order (C, then D from the new C), K steps in all, the output D C of the last.
- No causal form: D is fitted to every column of X, so every output position reads every input (a causal model
  is refused, E301).
- Padding: padded columns of X are zeroed and (VQ) their assignments too, so they reach neither D nor C's real
  columns: left or right padding, each sequence gives what it gives alone (NMF: C's init is 1/r on a zero
  column, which the first update sends to 0).
Cost: O((K + 1) n r e + K n r^2 + K e r^2) (_hamburger_cost.py); no n x n tensor.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..registry import Op, OpEnv, OpParams, ShapeProblem, register
from ._hamburger_cost import hamburger_cost

EPS = 1e-6


class HamburgerParams(OpParams):
    r: int = Field(64, ge=1, le=4096, description="the rank of the decomposition: D [e, r], C [r, n]")
    steps: int = Field(6, ge=1, le=64, description="K, the optimization steps (the gradient through the last)")
    kind: Literal["nmf", "vq"] = Field("nmf", description="NMF by multiplicative updates, or soft VQ (k-means)")
    d_ham: int | None = Field(None, ge=1, le=1 << 16, description="e, the width of the decomposed X; default d")
    temperature: float | None = Field(None, gt=0.0, le=1e4, description="vq: T of the soft assignment; 0.1")
    bias: bool = Field(True, description="biases on the lower and upper bread")


def hamburger_shape(p: HamburgerParams, env: OpEnv):
    if len(env.shape) != 3 or not isinstance(env.d, int):
        raise ShapeProblem(f"mixer(hamburger) needs a [b, n, d] stream, got [{', '.join(map(str, env.shape))}]",
                           hint="put embed(...) first")
    if p.temperature is not None and p.kind != "vq":
        raise ShapeProblem("temperature= is the soft assignment's (kind=vq); NMF has none", "temperature",
                           "remove temperature=, or set kind=vq")
    return env.shape


def nmf_step(x, c, dm, num=None):
    """x [b, n, e] (X^T), c [b, n, r] (C^T), dm [b, e, r] (D): one multiplicative update of C, then of D. num:
    X^T D when it is known already (the first step's, which C's init reads too)."""
    c = c * (x @ dm if num is None else num) / (c @ (dm.transpose(1, 2) @ dm) + EPS)
    dm = dm * (x.transpose(1, 2) @ c) / (dm @ (c.transpose(1, 2) @ c) + EPS)
    return c, dm


def vq_step(x, xn, dm, t: float, keep):
    """x, xn [b, n, e] (X^T and its unit columns), dm [b, e, r]: the soft assignment C^T [b, n, r], then the
    centres D = X C^T diag(C 1)^-1. keep [b, n, 1]: padded positions get no assignment."""
    c = torch.softmax((xn @ F.normalize(dm, dim=1, eps=EPS)) / t, dim=-1)
    if keep is not None:
        c = c * keep
    return c, (x.transpose(1, 2) @ c) / (c.sum(1, keepdim=True) + EPS)


class HamburgerMixer(nn.Module):
    def __init__(self, p: HamburgerParams, env: OpEnv):
        super().__init__()
        d, e = env.d, p.d_ham or env.d
        self.kind, self.steps, self.t = p.kind, p.steps, p.temperature or 0.1
        self.lower = nn.Linear(d, e, bias=p.bias)
        self.upper = nn.Linear(e, d, bias=p.bias)
        g = torch.Generator().manual_seed(0)
        d0 = torch.rand(e, p.r, generator=g) if p.kind == "nmf" else torch.randn(e, p.r, generator=g)
        self.register_buffer("bases", d0 / d0.norm(dim=0, keepdim=True), persistent=False)  # D's init [e, r]

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        mask = ctx.mask if ctx is not None else None
        keep = None if mask is None else mask[..., None].to(x.dtype)
        h = self.lower(x)
        if self.kind == "nmf":
            h = torch.relu(h)
        if keep is not None:
            h = h * keep
        dm = self.bases.expand(h.shape[0], *self.bases.shape)
        if self.kind == "nmf":
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.steps == 1):
                num = h @ dm  # X^T D of the init: C's init, and the first step's numerator
            with torch.no_grad():
                c = torch.softmax(num, dim=-1)
                for _ in range(self.steps - 1):
                    c, dm, num = *nmf_step(h, c, dm, num), None
            c, dm = nmf_step(h, c, dm, num)
            del num
        else:
            hn = F.normalize(h, dim=-1, eps=EPS)
            with torch.no_grad():
                for _ in range(self.steps - 1):
                    dm = vq_step(h, hn, dm, self.t, keep)[1]
            c, dm = vq_step(h, hn, dm, self.t, keep)
        return self.upper(c @ dm.transpose(1, 2))


OP = register(Op(
    decode=None,
    family="mixer", variant="hamburger", params=HamburgerParams, module=HamburgerMixer, causal="no",
    shape=hamburger_shape,
    paper="Is Attention Better Than Matrix Decomposition?, Geng et al. 2021, arXiv:2109.04553",
    summary="X = lower(x)^T [e, n] ~ D C (rank r, K steps of NMF multiplicative updates or soft VQ, the gradient "
            "through the last step), out = upper((D C)^T)",
    note="MHA/MatrixMethod/002.md", cost=hamburger_cost,
))
