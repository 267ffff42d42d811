"""mha(chord, factors=M, max_len=L): Paramixer's Chord mixing (Yu, Khalitov, Cheng, Yang; Sparse Factorization of
Large Square Matrices, arXiv:2109.08184, and its CVPR 2022 form, Paramixer: Parameterizing Mixing Links in Sparse
Factors Works Better than Dot-Product Self-Attention): the n x n mixing matrix is a product of M sparse factors
whose nonzero entries are computed from the tokens, no scores, no softmax.

Per head (h heads of width dh), with V = x W_v (kv_heads value heads, each shared by heads / kv_heads heads):

    out = W^(M) ... W^(2) W^(1) V,      W^(m)_{i, j} nonzero only for j in J_i = {i} u {(i + 2^k) mod n, k < K}

with K = ceil(log2 n) (the Chord protocol: every position reaches every other in at most K hops; n = 1: J_i = {i}).
The entries of row i are f_m(x_i) [h, 1 + K], a two-layer MLP of the token per factor (d -> hidden, GELU,
hidden -> h (1 + K_L)), its outputs in the order: i itself, then the links 2^0, 2^1, ...; then out -> W_o.

Choices where the paper is silent: the MLP's hidden width (default d) and GELU; K_L = ceil(log2 max_len) links are
what the MLP's output layer has, and a sequence of n <= max_len reads the first 1 + ceil(log2 n) (its longer
links would wrap onto shorter ones); the factors act on V with nothing between them; M defaults to 2.
Each factor runs as a gather and a small matmul: the rows' 1 + K linked values [n, 1 + K, dh] (indexed, never an
n x n matrix) times their entries [n, 1, 1 + K]: O(M n log n d) time, O(M n log n dh h) memory.
Causal: none (the paper's factors link forward and wrap around; a causal reading would be a new construction):
the shape pass refuses a causal model (E301). Padding: the links into padded positions get no weight, so no real
output reads padding; the pattern follows the padded length (pad_alone=False, as the wrap is mod n). No position
scheme (the factors are the positional structure); dropout= refused.
The export (a symbolic n) gathers all 1 + K_L links and zeroes those with 2^k >= n: the same sums, no branch on n.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from ...diagnostics import Diagnostic, EvoError
from ..registry import Op, OpEnv, ShapeProblem, register
from ._chord_cost import chord_cost
from ._common import AttentionParams, attention_shape


class ChordParams(AttentionParams):
    factors: int = Field(2, ge=1, le=64, description="M, the sparse factors multiplied")
    max_len: int = Field(..., ge=1, le=1 << 24, description="the longest sequence (the MLPs' 1 + ceil(log2 L) outputs)")
    hidden: int | None = Field(None, ge=1, le=1 << 16, description="the entry MLPs' hidden width; default d")


def links(n: int) -> int:
    """K = ceil(log2 n): the offsets 2^0 .. 2^(K-1), all below n."""
    return math.ceil(math.log2(n)) if n > 1 else 0


def chord_shape(p: ChordParams, env: OpEnv):
    if p.dropout:
        raise ShapeProblem("mha(chord) has no attention weights to drop out (its factors' dropout is not modelled)",
                           "dropout", "remove dropout=, or put dropout(standard) on the stream")
    shape = attention_shape(p, env)
    n = shape[1]
    if isinstance(n, int) and n > p.max_len:
        raise ShapeProblem(f"the stream has {n} positions, more than max_len={p.max_len}", "max_len",
                           f"the entry MLPs have 1 + ceil(log2 max_len) outputs: set max_len >= {n}")
    return shape


class ChordMixing(nn.Module):
    def __init__(self, p: ChordParams, env: OpEnv):
        super().__init__()
        d = env.d
        self.heads, self.kv_heads = p.heads, p.kv_heads or p.heads
        self.head_dim, self.max_len = p.head_dim or d // p.heads, p.max_len
        self.span = 1 + links(p.max_len)  # 1 + K_L entries a row and head
        hid = p.hidden or d
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=p.bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=p.bias)
        self.entries = nn.ModuleList(nn.Sequential(nn.Linear(d, hid, bias=p.bias), nn.GELU(),
                                                   nn.Linear(hid, self.heads * self.span, bias=p.bias))
                                     for _ in range(p.factors))

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        b, n, _ = x.shape
        if isinstance(n, int) and n > self.max_len:
            raise EvoError([Diagnostic("E410", f"mha(chord) has max_len={self.max_len}, the input {n} positions",
                                       help="set max_len to the longest sequence")])
        exporting = not isinstance(n, int) or torch.compiler.is_exporting()
        J = self.span if exporting else 1 + links(n)
        dev = x.device
        k = torch.arange(J - 1, device=dev)
        offsets = torch.cat((torch.zeros(1, dtype=torch.long, device=dev), 2 ** k))  # [J]: 0, 1, 2, 4, ...
        valid = offsets < n  # all of them but under export, where the links 2^k >= n get no weight
        t = torch.arange(n, device=dev)[:, None] + offsets * valid  # < 2 n: mod n is one subtraction (no Mod
        idx = torch.where(t >= n, t - n, t)  # [n, J]                  # by a symbolic n in the ONNX lowering)
        del t
        scale = valid.to(x.dtype) if exporting else None
        mask = ctx.mask if ctx is not None else None
        if mask is not None:  # no weight on a link into padding
            keep = mask[:, idx].to(x.dtype)[:, None]  # [b, 1, n, J]
            scale = keep if scale is None else keep * scale
        g = self.heads // self.kv_heads
        u = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        if g > 1:
            u = u.repeat_interleave(g, dim=1)  # [b, h, n, dh]
        for f in self.entries:
            w = f(x).view(b, n, self.heads, self.span)[..., :J].transpose(1, 2)  # [b, h, n, J]
            if scale is not None:
                w = w * scale
            u = (w.unsqueeze(-2) @ u[:, :, idx]).squeeze(-2)  # row i: sum_j w_ij u_{idx_ij}
        return self.o_proj(u.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


OP = register(Op(
    decode=None, pad_alone=False,
    family="mha", variant="chord", params=ChordParams, module=ChordMixing, causal="no", shape=chord_shape,
    paper="Sparse Factorization of Large Square Matrices, Khalitov et al. 2021, arXiv:2109.08184 (Paramixer, "
          "CVPR 2022)",
    summary="W^(M) ... W^(1) V per head, W^(m)_ij nonzero for j = i, (i + 2^k) mod n (k < ceil(log2 n)), the "
            "entries of row i an MLP of x_i; O(M n log n d), no n x n tensor",
    note="MHA/SparseOrLowRank/003.md", cost=chord_cost,
))
