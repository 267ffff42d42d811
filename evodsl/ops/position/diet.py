"""pos(diet, mode=abs|rel): DIET's decoupled positional attention (Chen et al. 2021, §3), applied inside every
attention layer downstream; on the stream it is the identity. Head h of a layer adds a position term straight to
its scaled content scores:

    abs: A_ij = q_i·k_j / sqrt(dh) + (P_Q^h P_K^h^T)_ij,   P_Q^h, P_K^h [max_len, rank] learned (low rank)
    rel: A_ij = q_i·k_j / sqrt(dh) + R^h_clamp(i - j, -k, k),  R^h a learned scalar per clipped distance

Choices where the paper is silent: each attention layer holds its own P_Q, P_K (or R), per head, initialised
N(0, 0.02); abs reads positions from each row's first token, so it needs right padding (left padding: E409) and
n <= max_len; rel's 2k + 1 distances are signed (bidirectional, i - j from -k to k; causal uses 0..k). The
segment term E_S of the paper belongs to the embedding (embed(token, segments=S)), not here. Both are causal:
the term depends on the positions only, and the causal mask keeps the future out; decoding adds the new
queries' terms against every cached key.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost, Symbols
from ..registry import Op, OpParams, register, require_right_padding, sequence_shape
from ._inattention import InAttentionPosition, InAttentionStream


class DietParams(OpParams):
    mode: Literal["abs", "rel"] = Field("abs", description="abs: P_Q P_K^T (low rank); rel: a scalar per distance")
    rank: int = Field(8, ge=1, le=4096, description="abs: the width of P_Q and P_K per head")
    max_len: int = Field(512, ge=1, le=1 << 20, description="abs: positions 0..max_len-1")
    k: int = Field(128, ge=1, le=1 << 20, description="rel: distances clipped to [-k, k]")


class DietPosition(InAttentionPosition):
    """bias(i, j) [h, n, L] for query positions i [n, 1] and key positions j [1, L]."""

    learned = True  # the bias has a gradient (the cost of the attention reads this)

    def __init__(self, p: DietParams, heads: int, head_dim: int):
        super().__init__()
        self.mode, self.k, self.max_len = p.mode, p.k, p.max_len
        if p.mode == "abs":
            self.p_q = nn.Parameter(torch.empty(heads, p.max_len, p.rank).normal_(0.0, 0.02))
            self.p_k = nn.Parameter(torch.empty(heads, p.max_len, p.rank).normal_(0.0, 0.02))
        else:
            self.r = nn.Parameter(torch.empty(heads, 2 * p.k + 1).normal_(0.0, 0.02))

    def bind(self, ctx) -> None:
        if self.mode == "abs" and ctx is not None:
            require_right_padding(ctx.mask, "pos(diet, mode=abs)", "its position scores read absolute positions, "
                                  "and left padding would move the tokens")

    def _positions(self, last) -> None:
        if self.mode == "abs" and isinstance(last, int) and last >= self.max_len:
            from ...diagnostics import Diagnostic, EvoError
            raise EvoError([Diagnostic("E435", f"pos(diet, mode=abs) has {self.max_len} positions, the sequence "
                                               f"reaches position {last}", help="raise max_len=")])

    def bias(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        if self.mode == "rel":
            return self.r[:, (i - j).clamp(-self.k, self.k) + self.k]
        if not (torch.jit.is_tracing() or torch.compiler.is_exporting()):
            self._positions(int(j.max()))
        return self.p_q[:, i.reshape(-1)] @ self.p_k[:, j.reshape(-1)].transpose(-1, -2)

    def dense(self, n, device):
        if self.mode == "rel" or not isinstance(n, int) or torch.compiler.is_exporting():
            return super().dense(n, device)  # a symbolic n (export): rows looked up, as a slice would guard on n
        self._positions(n - 1)
        return self.p_q[:, :n] @ self.p_k[:, :n].transpose(-1, -2)  # views of the tables: no lookup


def diet_attach_cost(p: DietParams, s: Symbols, heads, kv_heads, head_dim) -> Cost:
    """Inside dense attention: abs, P_Q P_K^T over the first n rows per head (a matmul); rel, the int64 clipped
    distances [n, n] and their lookup [h, n, n] (kept for the gradient, summed back onto R). The [h, n, n] term
    is added to every score; in training SDPA runs its math kernel (the term has a gradient)."""
    n2 = s.n ** 2
    if p.mode == "abs":
        return Cost(params=2 * heads * p.max_len * p.rank, fwd=2 * heads * n2 * p.rank, bwd=4 * heads * n2 * p.rank,
                    fwd_other=s.b * heads * n2, peak=heads * n2 * s.bytes)
    return Cost(params=heads * (2 * p.k + 1), fwd_other=4 * n2 + s.b * heads * n2, bwd_other=heads * n2,
                peak=heads * n2 * s.bytes + 8 * n2, saved=8 * n2)


OP = register(Op(
    decode="the position terms of the new queries against every key so far",
    shape=sequence_shape, family="pos", variant="diet", params=DietParams, module=InAttentionStream,
    causal="yes", attach=DietPosition, attach_cost=diet_attach_cost,
    cost=lambda p, env, s: Cost(inplace=True),  # the identity on the stream; each layer counts its own tables
    paper="A Simple and Effective Positional Encoding for Transformers, Chen et al. 2021, arXiv:2104.08698",
    summary="score_h(i, j) += (P_Q P_K^T)_ij (abs, low rank) or R_clamp(i - j) (rel), per head, no scale",
    note="Pe/001.md",
))
