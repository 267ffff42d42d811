"""pos(tupe, mode=abs|rel): TUPE's untied positional encoding (Ke, He & Liu 2020, §3), applied inside every
mha(softmax) downstream; on the stream it is the identity (no position embedding is added to the tokens).
Head h of every layer scores query i against key j as

    α_ij = (x_i W_Q)(x_j W_K)^T / sqrt(2 dh) + reset_θ((p_i U_Q)(p_j U_K)^T / sqrt(2 dh) [+ b_bucket(j - i)], i, j)

the content and the positional correlation each scaled by 1/sqrt(2 dh) (the attention's own scale, 1/sqrt(dh)
by default, divided by sqrt(2)). p_i are learned absolute position embeddings passed through a
LayerNorm (the authors' code: pos_ln), U_Q, U_K learned [d, d] projections with biases, split per head; mode=rel
adds T5's bucketed relative bias b (its bucketing function, t5_bias.t5_buckets). cls=true resets the first
token's terms (the paper's [CLS]): its row reads θ1 and, from every other query, its column θ2, learned per head.
p, the LayerNorm, U_Q, U_K, b and θ are one set for the whole model (the paper computes the correlation once and
shares it across layers): they live on the pos node and reach the attention layers through the Ctx; each layer
evaluates the term from them (the same values in every layer).
Choices where the paper is silent: θ per head, initialised 0; p, b N(0, 0.02). Positions are counted from each
row's first token, so it needs right padding (left padding: E409) and n <= max_len. Causal: the term depends on
the positions only, so the causal mask keeps the future out (TUPE is also evaluated as a decoder's encoding in
its appendix); decoding adds the new queries' terms against every cached key.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..registry import Op, OpEnv, OpParams, ShapeProblem, register, require_right_padding, sequence_shape
from ._inattention import UpstreamTablePosition
from ._tupe_cost import tupe_attach_cost, tupe_cost
from .t5_bias import t5_buckets


class TupeParams(OpParams):
    mode: Literal["abs", "rel"] = Field("abs", description="abs: the untied correlation; rel: plus T5's bucketed bias")
    heads: int = Field(8, ge=1, le=4096, description="heads of the attention layers it serves (binding heads)")
    max_len: int = Field(512, ge=1, le=1 << 20, description="positions 0..max_len-1")
    cls: bool = Field(False, description="reset the first token's row (θ1) and column (θ2), the paper's [CLS]")
    buckets: int = Field(32, ge=4, le=4096, description="rel: relative-distance buckets")
    max_distance: int = Field(128, ge=2, description="rel: distances from here on share the last bucket")


class TupeTable(nn.Module):
    """The stream's side: the identity, which hands p, U_Q, U_K (b, θ) to the attention layers after it (ctx)."""

    def __init__(self, p: TupeParams, env: OpEnv):
        super().__init__()
        d = env.d
        self.heads, self.head_dim, self.causal = p.heads, d // p.heads, env.causal
        self.mode, self.max_len, self.buckets, self.max_distance = p.mode, p.max_len, p.buckets, p.max_distance
        self.pos = nn.Parameter(torch.empty(p.max_len, d).normal_(0.0, 0.02))
        self.ln = nn.LayerNorm(d)
        self.u_q, self.u_k = nn.Linear(d, d), nn.Linear(d, d)
        self.rel = nn.Parameter(torch.empty(p.buckets, p.heads).normal_(0.0, 0.02)) if p.mode == "rel" else None
        self.theta = nn.Parameter(torch.zeros(2, p.heads)) if p.cls else None

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        if ctx is not None:
            ctx.extra["tupe"] = self
        return x

    def _per_head(self, layer: nn.Linear, rows: torch.Tensor) -> torch.Tensor:
        """rows U + c, per head [h, rows, dh] (functional calls: the rows are views of a parameter)."""
        out = nn.functional.linear(rows, layer.weight, layer.bias)
        return out.view(rows.shape[0], self.heads, self.head_dim).transpose(0, 1)

    def _norm(self, rows: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(rows, rows.shape[-1:], self.ln.weight, self.ln.bias, self.ln.eps)

    def bias(self, i: torch.Tensor, j: torch.Tensor, dense_n=None) -> torch.Tensor:
        """[h, n, L] for query positions i [n, 1] and key positions j [1, L]."""
        if dense_n is not None:  # i = j = 0..n-1: the rows once, a slice (a view) of the table
            rows = self._norm(self.pos[:dense_n])
            pq, pk = self._per_head(self.u_q, rows), self._per_head(self.u_k, rows)
        else:
            if not (torch.jit.is_tracing() or torch.compiler.is_exporting()) and int(j.max()) >= self.max_len:
                from ...diagnostics import Diagnostic, EvoError
                raise EvoError([Diagnostic("E436", f"pos(tupe) has {self.max_len} positions, the sequence reaches "
                                                   f"position {int(j.max())}", help="raise max_len=")])
            pq = self._per_head(self.u_q, self._norm(self.pos[i.reshape(-1)]))
            pk = self._per_head(self.u_k, self._norm(self.pos[j.reshape(-1)]))
        s = (pq @ pk.transpose(-1, -2)).mul_((2 * self.head_dim) ** -0.5)
        if self.rel is not None:
            idx = t5_buckets((j - i).contiguous(), self.causal, self.buckets, self.max_distance)
            s = s + nn.functional.embedding(idx, self.rel).movedim(-1, 0)
        if self.theta is not None:
            s = torch.where(j == 0, self.theta[1][:, None, None], s)  # others -> the first token: θ2
            s = torch.where(i == 0, self.theta[0][:, None, None], s)  # the first token -> every key: θ1
        return s


class TupePosition(UpstreamTablePosition):
    """Inside attention: the attention's scale divided by sqrt(2) (content at 1/sqrt(2 dh)), and the term of the
    bound table."""

    SCHEME = "tupe"
    learned = True  # the term has a gradient (the cost of the attention reads this)

    def bind(self, ctx) -> None:
        super().bind(ctx)
        if ctx is not None:
            require_right_padding(ctx.mask, "pos(tupe)", "its positions are counted from each row's first token, "
                                  "and left padding would move the tokens")

    def adopt(self, att) -> None:
        """Called by the attention once built: its content scores at 1/sqrt(2) of its scale (1/sqrt(2 dh))."""
        att.scale = (att.scale or att.head_dim ** -0.5) * 2 ** -0.5

    def dense(self, n, device) -> torch.Tensor:
        table = self._bound()
        if not isinstance(n, int) or torch.compiler.is_exporting():  # a slice would guard on a symbolic n
            return super().dense(n, device)
        if n > table.max_len:
            return self.bias(torch.arange(n, device=device)[:, None], torch.arange(n, device=device)[None, :])
        idx = torch.arange(n, device=device)
        return table.bias(idx[:, None], idx[None, :], dense_n=n)


def _shape(p: TupeParams, env: OpEnv):
    sequence_shape(p, env)
    if env.d % p.heads:
        raise ShapeProblem(f"pos(tupe) splits d_model={env.d} into heads={p.heads}", "heads",
                           "heads must divide d_model")
    return env.shape


OP = register(Op(
    decode="the positional terms of the new queries against every key so far",
    shape=_shape, family="pos", variant="tupe", params=TupeParams, module=TupeTable, causal="yes",
    attach=TupePosition, attach_cost=tupe_attach_cost, cost=tupe_cost,
    paper="Rethinking Positional Encoding in Language Pre-training, Ke, He & Liu 2020, arXiv:2006.15595",
    summary="α_ij = (x_i W_Q)(x_j W_K)^T / sqrt(2 dh) + reset_θ((p_i U_Q)(p_j U_K)^T / sqrt(2 dh) [+ b_{j-i}]), "
            "one p, U_Q, U_K for every layer",
    note="Pe/008.md",
))
