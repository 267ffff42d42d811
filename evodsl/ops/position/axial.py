"""pos(axial, n1=N1, n2=N2, d1=D1, d2=D2): Reformer's axial position embeddings (Kitaev et al. 2020, section 5
"axial positional encodings"; HF's AxialPositionEmbeddings). The N1·N2 positions are laid out as an N1 x N2 grid;
two learned tables E1 [N1, D1] and E2 [N2, D2] (D1 + D2 = d) give position t

    h_t = x_t + concat(E1[t // N2], E2[t % N2])

(HF's layout: its weights [N1, 1, D1] and [1, N2, D2] broadcast to [N1, N2, ·], concatenated along features and
flattened row-major, so t = i·N2 + j). N1·D1 + N2·D2 parameters instead of N1·N2·d. Sequences up to N1·N2.

Choices where the paper is silent, as HF: `dropout=p` (HF's hidden_dropout_prob on the embeddings, training
only) is dropout2d of the grid transposed to [b, N2, N1, d], i.e. one keep/drop draw per batch row and column j
of the grid, scaling by 1/(1 - p): here that mask [b, N2] is gathered at t % N2 (the same numbers for t < n,
without building the [N1·N2, d] grid). HF also refuses to train on a sequence other than N1·N2 long; this op
takes any n <= N1·N2. Causal: position t reads its own index only; decoding continues at t = the tokens seen.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register, sequence_shape


class AxialPositionParams(OpParams):
    n1: int = Field(ge=1, le=1 << 16, description="rows of the position grid (HF axial_pos_shape[0])")
    n2: int = Field(ge=1, le=1 << 16, description="columns of the position grid (axial_pos_shape[1])")
    d1: int = Field(ge=1, le=1 << 16, description="features of the row table E1 (axial_pos_embds_dim[0])")
    d2: int = Field(ge=1, le=1 << 16, description="features of the column table E2 (axial_pos_embds_dim[1])")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="training: drop grid columns per batch row (HF)")


class AxialPosition(nn.Module):
    def __init__(self, p: AxialPositionParams, env: OpEnv):
        super().__init__()
        # E1 [n1, 1, d1] and E2 [1, n2, d2]: HF's shapes (its checkpoints load as they are)
        self.row = nn.Parameter(torch.empty(p.n1, 1, p.d1).normal_(0.0, 0.02))
        self.col = nn.Parameter(torch.empty(1, p.n2, p.d2).normal_(0.0, 0.02))
        self.n2, self.size, self.dropout = p.n2, p.n1 * p.n2, p.dropout

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        n, start = x.shape[1], ctx.offset if ctx is not None else 0  # decoding: after those seen
        torch._check(start + n <= self.size, lambda: "sequence longer than pos(axial)'s n1 * n2 positions")
        t = torch.arange(start, start + n, device=x.device)
        j = t % self.n2
        enc = torch.cat([self.row[t // self.n2, 0], self.col[0, j]], dim=-1).to(x.dtype)  # [n, d]
        if self.training and self.dropout > 0:
            keep = torch.rand(x.shape[0], self.n2, device=x.device) >= self.dropout
            return x + enc * (keep[:, j, None].to(x.dtype) / (1 - self.dropout))
        return x + enc


def _shape(p: AxialPositionParams, env: OpEnv):
    sequence_shape(p, env)
    if p.d1 + p.d2 != env.d:
        raise ShapeProblem(f"pos(axial): d1 + d2 = {p.d1 + p.d2}, but the stream is {env.d} wide", "d2",
                           f"split the width: d1 + d2 = {env.d}")
    return env.shape


def cost(p: AxialPositionParams, env: OpEnv, s) -> Cost:
    """N1·D1 + N2·D2 parameters. The add, 1 FLOP per element (dropout: 2 more, the mask's scale and product).
    Kept for backward: the two gather indices (int64 [n] each; E1's and E2's gradients scatter into them), and
    with dropout the scaled mask [b, n]. Inference peak beyond input and output: the two indices and the rows added,
    concatenated ([n, d]; the positions and each table's rows are freed on the way). The input's gradient is the
    output's (bwd_peak 0)."""
    n1, n2, d1, d2 = (s.sym(k, getattr(p, k)) for k in ("n1", "n2", "d1", "d2"))
    drop = p.dropout > 0
    return Cost(params=n1 * d1 + n2 * d2,
                fwd_other=s.b * s.n * s.d * (3 if drop else 1), bwd_other=s.b * s.n * s.d,
                saved=16 * s.n + (s.b * s.n * s.bytes if drop else 0),
                peak=16 * s.n + s.n * s.d * s.bytes, bwd_peak=0)


OP = register(Op(
    decode="the positions after those seen (offset)",
    family="pos", variant="axial", params=AxialPositionParams, module=AxialPosition, causal="yes",
    shape=_shape,
    paper="Reformer: The Efficient Transformer, Kitaev et al. 2020, arXiv:2001.04451 (axial positions: HF "
          "AxialPositionEmbeddings)",
    summary="x_t + [E1[t // n2], E2[t % n2]], t < n1 n2", cost=cost,
))
