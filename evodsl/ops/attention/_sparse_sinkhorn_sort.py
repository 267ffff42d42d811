"""The sorting network of mha(sparse_sinkhorn) (sparse_sinkhorn.py): block summaries -> [m, m] logits -> Sinkhorn's
soft permutation, bidirectional (masked to each row's real blocks under padding) and causal (Causal Sinkhorn
Balancing: only past blocks, columns normalised over the rows so far)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def masked_sinkhorn_log(c: torch.Tensor, iters: int, allowed: torch.Tensor | None) -> torch.Tensor:
    """c [..., m, m] logits -> log S after `iters` iterations of F_c(F_r(.)): rows (the last axis), then columns,
    each in log space; `allowed` (bool, broadcast to c, at least one entry in every row and column) keeps the
    others at -inf."""
    if allowed is not None:
        c = c.masked_fill(~allowed, float("-inf"))
    for _ in range(iters):
        c = c - c.logsumexp(-1, keepdim=True)
        c = c - c.logsumexp(-2, keepdim=True)
    return c


def causal_sinkhorn_log(c: torch.Tensor, iters: int) -> torch.Tensor:
    """Causal Sinkhorn balancing: row i of c [..., m, m] may pick blocks j < i only; each iteration normalises a
    row over j < i, then entry (i, j) by the column's sum over the rows k <= i (a prefix: row i never reads a later
    row). Masked entries are the dtype's lowest finite value (row 0 has no past block: it stays all masked, exp = 0).
    After the first row step every entry is <= 0, so the prefix sums of exp need no max (no overflow; a prefix
    that underflows is clamped to the smallest normal number, never log 0)."""
    m = c.shape[-1]
    i = torch.arange(m, device=c.device)
    blocked = i[None, :] >= i[:, None]  # j >= i
    low, tiny = torch.finfo(c.dtype).min, torch.finfo(c.dtype).tiny
    c = c.masked_fill(blocked, low)
    for _ in range(iters):
        c = (c - c.logsumexp(-1, keepdim=True)).masked_fill(blocked, low)
        c = (c - c.exp().cumsum(-2).clamp_min(tiny).log()).masked_fill(blocked, low)
    return c


class SortNet(nn.Module):
    """R = relu(W_B relu(W_P psi(X) + b_P) + b_B): psi(X) [b, m, d] the block summaries; W_B has N_B = ceil(max_len /
    B) outputs, of which a sequence of m blocks uses the first m (the blocks it has)."""

    def __init__(self, d: int, blocks: int, bias: bool):
        super().__init__()
        self.hidden = nn.Linear(d, d, bias=bias)  # W_P
        self.logits = nn.Linear(d, blocks, bias=bias)  # W_B

    def forward(self, summary: torch.Tensor, m) -> torch.Tensor:
        r = F.relu(self.logits(F.relu(self.hidden(summary))))
        # not [..., :m]: export would guard m != N_B; the export's extra block (past max_len) repeats the last column
        return r.index_select(-1, torch.arange(m, device=r.device).clamp(max=r.shape[-1] - 1))


def block_summaries(x: torch.Tensor, m, causal: bool) -> torch.Tensor:
    """x [b, m, B, d] (zero past n and at padding) -> [b, m, d]: each block's sum (psi_P, sum pooling); causal, the
    mean of the past blocks' sums (zero for block 0), which every query of the block may read."""
    s = x.sum(2)
    if not causal:
        return s
    count = torch.arange(m, device=x.device).clamp(min=1).to(x.dtype)[None, :, None]
    return F.pad(s.cumsum(1), (0, 0, 1, 0))[:, :m] / count  # the sums before each block, shifted: exact
