"""mixer(daft, max_len=L, rank=d1): the Dot product Attention Free Transformer (the AFT authors' ICLR 2022
submission), AFT-full with its position bias factorised into two learned [max_len, d1] tables:

    W = P1 P2^T [n, n],   Y_t = sigmoid(Q_t) * sum_r exp(K_r + W_tr) V_r / sum_r exp(K_r + W_tr),   out = Y W_o

per channel (the note's o_i = sigma_q(q_i) * sum_j exp(k_j + w_ij) v_j / sum_j exp(k_j + w_ij)). W costs n^2 d1
(a matmul), the sums exp(W) (exp(K) V) and exp(W) exp(K) n^2 d as in AFT-full (the note's O(d^2 n + n^2 d1)
leaves those out: exp(W) does not factor, so no form avoids them); 2 L d1 parameters instead of L^2. Causal:
r <= t. The numerics, padding (right padding only: W reads absolute positions), the decoding step (the K/V cache)
are AFT-full's (aft.py, _aft.py).
"""
from __future__ import annotations

import sympy as sp
import torch
from pydantic import Field
from torch import nn

from ..cost import Cost, Symbols
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register
from .aft import AFTParams, AttentionFreeMixer, aft_cost, aft_shape


class DAFTParams(OpParams):
    max_len: int = Field(..., ge=1, le=65536, description="the longest sequence: rows of P1 and P2")
    rank: int = Field(64, ge=1, le=4096, description="d1, the width of P1 and P2: W = P1 P2^T has rank d1")
    bias: bool = Field(True, description="biases on the q, k, v and output projections")


def _as_aft(p: DAFTParams) -> AFTParams:
    return AFTParams(mode="full", max_len=p.max_len, bias=p.bias)


def daft_shape(p: DAFTParams, env: OpEnv):
    try:
        return aft_shape(_as_aft(p), env)
    except ShapeProblem as err:
        raise ShapeProblem(err.message.replace("mixer(aft, mode=full)", "mixer(daft)"), err.field, err.hint)


class DotProductFreeMixer(AttentionFreeMixer):
    """AttentionFreeMixer in its full mode, with w = P1 P2^T computed for the rows and columns it reads."""

    def __init__(self, p: DAFTParams, env: OpEnv):
        super().__init__(_as_aft(p), env)
        del self.w
        self.w, self.label = None, "mixer(daft)"
        std = p.rank ** -0.25  # P1 P2^T of entries of unit variance at initialisation
        self.p1 = nn.Parameter(torch.empty(p.max_len, p.rank).normal_(0.0, std))
        self.p2 = nn.Parameter(torch.empty(p.max_len, p.rank).normal_(0.0, std))

    def rows(self, p0: int, T) -> torch.Tensor:
        """W of the queries p0..T-1 against the keys 0..T-1: P1[p0:T] P2[:T]^T."""
        if isinstance(T, int) and not torch.compiler.is_exporting():
            return self.p1[p0:T] @ self.p2[:T].T
        idx = torch.arange(T, device=self.p1.device)
        return self.p1.index_select(0, idx[p0:]) @ self.p2.index_select(0, idx).T


def daft_cost(p: DAFTParams, env: OpEnv, s: Symbols) -> Cost:
    """AFT-full's (aft_cost) with W = P1 P2^T: 2 n^2 d1 FLOPs forward (twice that backward: P1's and P2's
    gradients), 2 L d1 parameters instead of L^2; W itself is an [n, n] tensor more, not kept (the subtraction of
    its row maximum keeps nothing); causal, at the inference peak beside the bool mask and the masked copy."""
    full = aft_cost(_as_aft(p), env, s)
    L, d1, n, by = s.sym("L", p.max_len), s.sym("d1", p.rank), s.n, s.bytes
    E, u = n * n * by, s.b * n * s.d * by
    # causal: W, the bool mask and the masked copy at once, beside exp(K) and exp(K) V (less the output)
    peak = sp.Max(full.peak, u + 2 * E + n * n) if env.causal else full.peak
    return Cost(params=full.params - L * L + 2 * L * d1, fwd=full.fwd + 2 * n * n * d1,
                bwd=full.bwd + 4 * n * n * d1, fwd_other=full.fwd_other, bwd_other=full.bwd_other,
                saved=full.saved, saves_input=True, peak=peak, cache=full.cache, bwd_peak=full.bwd_peak)


OP = register(Op(
    decode="the cache of K and V, [n, d] each",
    family="mixer", variant="daft", params=DAFTParams, module=DotProductFreeMixer, causal="yes", shape=daft_shape,
    paper="A Dot Product Attention Free Transformer, Zhai et al. 2021, openreview JVR4JswsEM",
    summary="AFT-full with w = P1 P2^T (rank d1): sigmoid(Q_t) * sum_r exp(K_r + w_tr) V_r / sum_r exp(K_r + w_tr)",
    cost=daft_cost, note="MHA/RightProduct/008.md",
))
