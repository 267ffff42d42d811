"""mha(isab, m=M): the Set Transformer's induced set attention block (Lee et al. 2019), O(n m d).

With M learned inducing points I in R^{M x d} and the paper's multihead attention block

    MAB(X, Y) = LayerNorm(H + rFF(H)),   H = LayerNorm(X + Multihead(X, Y, Y))

ISAB_M(X) = MAB(X, MAB(I, X)): the inducing points attend the set (H = MAB(I, X) in R^{M x d}), then the set
attends them back. The op is that block up to its last attention:

    H = MAB(I, X) (entire: residual on I, LayerNorm, rFF, LayerNorm),   out = Multihead(X, H, H)

and the outer MAB's residual, LayerNorm and rFF belong to the spec around it (post-norm: a residual mha, norm,
residual ffn, norm), as in any attention block. Multihead is Vaswani's (1/sqrt(dh) scores, an output
projection; the authors' code scales by sqrt(d) and adds its residual to the projected queries); rFF(h) =
relu(W h + b), the row-wise layer of the authors' code. Both attentions run as SDPA: [M, n] then [n, M] scores
per head, never n x n. Padding: padded elements are masked as keys of the first attention, so a padded batch
equals each set alone. K/V heads (GQA) serve both attentions. No causal form (H reads every element).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..cost import Cost, Symbols, linear
from ..registry import Op, OpEnv, ShapeProblem, register
from ._common import LSE_BYTES, AttentionBase, AttentionParams, attention_cost, attention_shape, head_symbols


class IsabParams(AttentionParams):
    m: int = Field(16, ge=1, le=1 << 16, description="M: learned inducing points")


def no_dropout_shape(op_id: str):
    """attention_shape, with dropout= refused (the paper's attentions have none)."""
    def shape(p: AttentionParams, env: OpEnv):
        if p.dropout:
            raise ShapeProblem(f"{op_id} has no dropout on its attention weights", "dropout",
                               "remove dropout=, or put dropout(standard) on the stream")
        return attention_shape(p, env)
    return shape


class InducedSetAttention(AttentionBase):
    """q_proj, o_proj: the set's queries and output (second attention); k_proj, v_proj: the set's keys and values
    (first attention); i_q, i_o: the inducing points' queries and output; h_k, h_v: the keys and values of H."""

    def __init__(self, p: IsabParams, env: OpEnv):
        super().__init__(p, env)
        d, hd, kvd = env.d, self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.inducing = nn.Parameter(torch.empty(p.m, d).normal_(0.0, d ** -0.5))
        self.i_q, self.i_o = nn.Linear(d, hd, bias=p.bias), nn.Linear(hd, d, bias=p.bias)
        self.norm0, self.norm1 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.rff = nn.Linear(d, d)
        self.h_k, self.h_v = nn.Linear(d, kvd, bias=p.bias), nn.Linear(d, kvd, bias=p.bias)

    def _heads(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, heads, self.head_dim).transpose(1, 2)

    def forward(self, x, ctx):
        mask = self.key_mask(ctx)
        keep = None if mask is None else mask[:, None, None, :]
        if keep is not None:
            keep = keep | ~keep.any(-1, keepdim=True)  # a row with no element reads all: finite, read by no one
        kh, vh = self._induced_kv(x, keep)
        # Multihead(X, H, H)
        o = F.scaled_dot_product_attention(self._heads(self.q_proj(x), self.heads), kh, vh,
                                           enable_gqa=self.kv_heads != self.heads)
        del kh, vh
        return self.out(o)

    def _induced_kv(self, x, keep):
        """The keys and values of H = MAB(I, X), [b, kv_heads, M, dh]: the inducing points' queries (one
        projection, shared by the batch) over the set, residual, LayerNorm, rFF, LayerNorm. Its temporaries die
        on return."""
        b, h, kv = x.shape[0], self.heads, self.kv_heads
        o = F.scaled_dot_product_attention(self._heads(self.i_q(self.inducing)[None], h).expand(b, -1, -1, -1),
                                           self._heads(self.k_proj(x), kv), self._heads(self.v_proj(x), kv),
                                           attn_mask=keep, enable_gqa=kv != h)
        m = o.shape[2]
        o = self.i_o(o.transpose(1, 2).reshape(b, m, h * self.head_dim))  # the SDPA output dies here
        hh = self.norm0(o + self.inducing)
        hh = self.norm1(hh + F.relu(self.rff(hh)))
        return self._heads(self.h_k(hh), kv), self._heads(self.h_v(hh), kv)


def isab_cost(p: IsabParams, env: OpEnv, s: Symbols) -> Cost:
    """The set's q, k, v, o projections; the inducing points' query projection (once, not per sequence), the
    first MAB's output projection, LayerNorms and rFF on b*M rows; H's key and value projections; SDPA over
    [b, h, M, n] and [b, h, n, M] scores."""
    h, kv, dh = head_symbols(p, s)
    b, n, by, d = s.b, s.n, s.bytes, s.d
    M = s.sym("M", p.m)
    rows = b * M
    mab = (linear(s, d, h * dh, p.bias, tokens=M) + linear(s, h * dh, d, p.bias, tokens=rows)
           + linear(s, d, d, True, tokens=rows) + linear(s, d, kv * dh, p.bias, tokens=rows).scaled(2))
    mab = Cost(params=mab.params + M * d + 4 * d, fwd=mab.fwd, bwd=mab.bwd,
               fwd_other=mab.fwd_other + 18 * rows * d, bwd_other=mab.bwd_other + 36 * rows * d)
    scores = b * h * M * n
    core = Cost(fwd=8 * scores * dh, bwd=20 * scores * dh, fwd_other=10 * scores, bwd_other=20 * scores)
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * d * by
    qm, kvm, hm = b * M * h * dh * by, b * M * kv * dh * by, b * M * d * by
    qi, lse_m, lse_n = M * h * dh * by, LSE_BYTES * b * h * M, LSE_BYTES * b * h * n
    # kept: the set's k and v, the inducing queries (one copy, expanded over the batch), the first SDPA's output
    # and logsumexp (i_o reads the output uncopied), the MAB's five [b, M, d] tensors (norm0's input and output,
    # relu's output, norm1's input and output) and the norms' float32 statistics, H's k and v, the set's q, the
    # second SDPA's output and logsumexp
    saved = 2 * kvb + qi + qm + lse_m + 5 * hm + 2 * 2 * 4 * rows + 2 * kvm + 2 * q + lse_n
    phases = [2 * kvb + qi + qm + lse_m,  # the first attention
              qm + hm,  # i_o: its input and output
              4 * hm + 4 * 2 * rows,  # norm1: rFF's input and output, their sum, its output
              2 * q + 2 * kvm + lse_n,  # the second attention: q, H's k and v, its output
              q + out]  # at o_proj
    # backward: the second attention's gradients (o's, q's, H's k and v); H's two (through h_k and h_v) beside
    # one of k's, v's and the input's from q_proj, the second attention's saved tensors released; the first
    # attention's (o's, the inducing queries', the set's k and v), the MAB's tensors released too
    late = 2 * q + lse_n + 2 * kvm
    bwd = [2 * q + 2 * kvm, out + 2 * hm + kvm - late,
           out + 2 * qm + 2 * kvb - (late + 5 * hm + 2 * 4 * rows)]
    return attention_cost(p, s, h, kv, dh, mab + core, Cost(), saved, phases, cache=0, bwd_phases=bwd)


OP = register(Op(
    decode=None,  # bidirectional only: H reads every element of the set
    family="mha", variant="isab", params=IsabParams, module=InducedSetAttention,
    causal="no", shape=no_dropout_shape("mha(isab)"), cost=isab_cost,
    paper="Set Transformer: A Framework for Attention-based Permutation-Invariant Neural Networks, Lee et al. "
          "2019, arXiv:1810.00825",
    summary="Multihead(X, H, H), H = MAB(I, X) = LN(H0 + rFF(H0)), H0 = LN(I + Multihead(I, X, X)), I in "
            "R^{M x d} learned inducing points; O(n M d)",
    note="",  # no note in the reference; CATALOG.md lists it (afa)
))
