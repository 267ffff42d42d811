"""mha(linformer, k=K): Linformer (Wang et al. 2020), keys and values projected along the sequence to K rows.

With learned E, F in R^{K x N} (N = max_len; a sequence of n <= N positions uses their first n columns), per
head i

    head_i = softmax(Q_i (E K_i)^T / sqrt(dh)) (F V_i),      E K_i, F V_i in R^{K x dh}

so the scores are n x K: O(n K d) time and memory. E and F are shared by the heads of a layer (the paper's
headwise sharing); share_kv=true makes F = E (its key-value sharing). The projection mixes every position into
every projected key: no causal form (the paper's is bidirectional). Padding: padded keys and values are zeroed
before the projection, which equals the unpadded sequence when the padding comes after the tokens (right
padding); left padding would move the tokens to other columns of E, and is refused (E409).
"""
from __future__ import annotations

import sympy as sp
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...diagnostics import Diagnostic, EvoError
from ..cost import Cost, Symbols
from ..registry import Op, OpEnv, ShapeProblem, register, require_right_padding
from ._common import LSE_BYTES, AttentionBase, AttentionParams, attention_cost, attention_shape, head_symbols


class LinformerParams(AttentionParams):
    k: int = Field(256, ge=1, le=1 << 20, description="K: rows the keys and values are projected to")
    max_len: int = Field(4096, ge=1, le=1 << 22, description="N: the longest sequence (columns of E and F)")
    share_kv: bool = Field(False, description="one projection for keys and values (F = E)")


def linformer_shape(p: LinformerParams, env: OpEnv):
    shape = attention_shape(p, env)
    if p.k > p.max_len:
        raise ShapeProblem(f"k={p.k} is more than max_len={p.max_len}", "k",
                           "the projection shortens the sequence: k <= max_len")
    n = env.shape[1]
    if isinstance(n, int) and n > p.max_len:
        raise ShapeProblem(f"the stream has {n} positions, more than max_len={p.max_len}", "max_len",
                           f"E and F have max_len columns: set max_len >= {n}")
    return shape


class LinformerAttention(AttentionBase):
    def __init__(self, p: LinformerParams, env: OpEnv):
        super().__init__(p, env)
        self.max_len = p.max_len
        std = p.k ** -0.5
        self.E = nn.Parameter(torch.empty(p.k, p.max_len).normal_(0.0, std))
        self.F = None if p.share_kv else nn.Parameter(torch.empty(p.k, p.max_len).normal_(0.0, std))

    def forward(self, x, ctx):
        n = x.shape[1]
        if isinstance(n, int) and n > self.max_len:
            raise EvoError([Diagnostic("E410", f"mha(linformer) has max_len={self.max_len}, the input {n} positions",
                                       help="set max_len to the longest sequence")])
        q, k, v = self.qkv(x)
        mask = ctx.mask if ctx is not None else None
        if mask is not None:
            require_right_padding(mask, "mha(linformer)", "its projection reads positions, and left padding moves "
                                                          "the tokens")  # exported: right padding assumed
            keep = mask[:, None, :, None].to(k.dtype)
            k, v = k * keep, v * keep
        E, Fm = self._columns(self.E, n), (None if self.F is None else self._columns(self.F, n))
        kp = E @ k  # [b, kv, K, dh]
        vp = (E if Fm is None else Fm) @ v
        o = F.scaled_dot_product_attention(q, kp, vp, dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.kv_heads != self.heads)
        return self.out(o)


    @staticmethod
    def _columns(table: torch.Tensor, n) -> torch.Tensor:
        """The first n columns of E or F: a view; gathered when exporting, where a view's layout would depend on
        whether n is max_len (the whole table), which a graph for every n cannot know."""
        if isinstance(n, int) and not torch.compiler.is_exporting():
            return table[:, :n]
        return table.index_select(1, torch.arange(n, device=table.device))


def linformer_cost(p: LinformerParams, env: OpEnv, s: Symbols) -> Cost:
    """The projections, E K and F V ([K, n] @ [n, dh] per K/V head, with E's and F's gradients), SDPA over
    [b, h, n, K] scores (the fused kernel; the math kernel with dropout)."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    K = s.sym("k", p.k)
    tables = (1 if p.share_kv else 2) * K * s.sym("N", p.max_len)
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    kp = b * K * kv * dh * by  # E K (and F V)
    scores = b * h * n * K
    proj = Cost(params=tables, fwd=2 * 2 * b * kv * K * n * dh, bwd=2 * 4 * b * kv * K * n * dh)
    if p.dropout > 0:
        core = Cost(fwd=4 * scores * dh, bwd=8 * scores * dh, fwd_other=5 * scores, bwd_other=10 * scores)
        # the math kernel (float32): q scaled, E K and F V (h heads), the weights, their dropout mask and the
        # dropped weights; o_proj's copy of the output. Its backward: o's gradient beside a copy of (E K)'s
        # gradient in the layout of the batch (one sequence: a view)
        saved = 2 * kvb + (b * n * h * dh + 2 * b * h * K * dh + 3 * scores) * max(by, 4) + q
        bwd = [q + kp * sp.Min(1, b - 1)]
    else:
        core = Cost(fwd=4 * scores * dh, bwd=10 * scores * dh, fwd_other=5 * scores, bwd_other=10 * scores)
        # q, k and v (kept by the projections E K, F V), E K and F V, SDPA's output and its logsumexp
        saved = q + 2 * kvb + 2 * kp + q + LSE_BYTES * b * h * n
        bwd = [2 * q + 2 * kp]  # o's gradient and q's, those of E K and F V
    phases = [q + 2 * kvb + 2 * kp + q + out]  # at o_proj
    return attention_cost(p, s, h, kv, dh, proj + core, Cost(), saved, phases, cache=0, bwd_phases=bwd)


OP = register(Op(
    decode=None,  # bidirectional only: the projection reads every position
    family="mha", variant="linformer", params=LinformerParams, module=LinformerAttention,
    causal="no", shape=linformer_shape, cost=linformer_cost,
    paper="Linformer: Self-Attention with Linear Complexity, Wang et al. 2020, arXiv:2006.04768",
    summary="softmax(Q (E K)^T / sqrt(dh)) (F V), E, F in R^{k x n} learned, shared by the heads; O(n k d)",
    note="seeds/002 (efficient attention list)",
))
