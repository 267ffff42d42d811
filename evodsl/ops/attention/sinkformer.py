"""mha(sinkformer, iters=T): Sinkformers (Sander, Ablin, Blondel & Peyre 2022, arXiv:2110.11773), per head

    C = Q K^T / sqrt(dh),   K^0 = exp(C),   K^{l+1} = N_R(K^l) if l is even, N_C(K^l) if l is odd,   o = K^T V

with N_R dividing each row by its sum and N_C each column by its sum: Sinkhorn's algorithm, whose limit K^inf is
doubly stochastic (K^inf 1 = 1, K^inf^T 1 = 1). T = iters counts the normalisations, rows first: T = 1 is the
row softmax, softmax attention itself; the paper's ViT runs a few (3, our default; its choice per task). Here the
iterations run in log space, C^{l+1} = C^l - logsumexp(C^l) over the row (l even) or the column (l odd), and the
weights are exp(C^T): the same matrix, without overflow. An odd T ends on a row normalisation (rows sum to 1
exactly, columns nearly); an even T on a column one. Autograd runs through every iteration (the paper's
choice: it differentiates the unrolled iterations, not the fixed point).

No causal form (causal="no"): a column normalisation divides each weight by a sum over every query, the later
ones included, so an output at t would change with tokens after t; the paper defines none (its models are
encoders, ViT and point clouds). Cost: the [n, n] weights are the column sums' input and are materialised per
head, O(n^2 d) time and O(T n^2) bytes kept for backward (every iteration's input; logsumexp keeps it), O(n^2)
at the inference peak; no SDPA: its kernel cannot normalise columns. Padding: a padded key's column and a padded
query's row are out of every sum (-inf), and a padded query reads its own key alone (its row and column are then
that one entry): the tokens' block is the sequence's alone, wherever the padding is. GQA: each K/V head repeated
to its query heads. No position scheme inside and no dropout (refused): the paper's ViT has neither inside.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field

from ..registry import Op, OpEnv, register
from ._common import AttentionBase, AttentionParams
from ._sinkformer_cost import sinkformer_cost
from .isab import no_dropout_shape


class SinkformerParams(AttentionParams):
    iters: int = Field(3, ge=1, le=64, description="Sinkhorn normalisations, rows first then columns, alternating; "
                                                   "1 = softmax")


def sinkhorn_log(c: torch.Tensor, iters: int) -> torch.Tensor:
    """c [..., n, m] log weights -> log weights after `iters` normalisations: rows (the last axis) first."""
    for i in range(iters):
        c = c - c.logsumexp(-1 if i % 2 == 0 else -2, keepdim=True)
    return c


class SinkformerAttention(AttentionBase):
    def __init__(self, p: SinkformerParams, env: OpEnv):
        super().__init__(p, env)
        self.iters = p.iters

    def forward(self, x, ctx):
        b, n, _ = x.shape
        q, k, v = self.qkv(x)
        k, v = self.expand_kv(k), self.expand_kv(v)
        c = (q * (1.0 / math.sqrt(self.head_dim))) @ k.transpose(-1, -2)  # [b, h, n, n]
        key_mask = self.key_mask(ctx)
        if key_mask is not None:  # tokens x tokens, and each padded position with itself alone
            keep = key_mask[:, None, :, None] & key_mask[:, None, None, :]
            idx = torch.arange(n, device=x.device)
            own = (idx[:, None] == idx[None, :]) & ~key_mask[:, None, :, None]
            c = c.masked_fill(~(keep | own), float("-inf"))
        w = sinkhorn_log(c, self.iters).exp()
        return self.out(w @ v)


OP = register(Op(
    decode=None,  # bidirectional only: each column normalisation sums over every query
    family="mha", variant="sinkformer", params=SinkformerParams, module=SinkformerAttention,
    causal="no", shape=no_dropout_shape("mha(sinkformer)"), cost=sinkformer_cost,
    paper="Sinkformers: Transformers with Doubly Stochastic Attention, Sander et al. 2022, arXiv:2110.11773",
    summary="exp(QK^T/sqrt(dh)) normalised by iters Sinkhorn steps (rows, columns, alternating; in log space) "
            "towards a doubly stochastic matrix, times V; iters=1 is softmax; O(n^2 d), [n, n] weights kept",
    note="MHA/Others/005.md",
))
