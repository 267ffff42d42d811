"""mha(sac, k=K, edge_dim=r): Sparse Adaptive Connection (SAC: Accelerating and Structuring Self-Attention via Sparse
Adaptive Connection, Li et al. 2020, arXiv:2003.09833): self-attention as graph attention over a sparse graph whose
edges an edge predictor chooses from the input, k edges into each query.

What runs (per layer, shared by all heads):

    a_i = W_a x_i,  c_j = W_c x_j  (r dims),   e_ij = a_i . c_j / sqrt(r)              the edge scores
    N(i) = top-k_j e_ij  (causal: over j <= i)                                          the chosen edges
    o_i = sum_{j in N(i)} softmax_{j in N(i)}(q_i . k_j / sqrt(dh) + e_ij) v_j          attention on the edges

What is the paper's and what is not: the paper's layer is attention restricted to the predicted graph (each node
attends over its predicted neighbours, one softmax of q . k / sqrt(dh) over them), O(n k d) for k edges a node; that
is kept. Its edge predictor is an LSTM that emits the edges one by one, each endpoint a pointer (a softmax over all n
nodes), trained by policy gradient (REINFORCE, the task loss as the reward): a sampling procedure with its own
training loop, not a forward layer. In its place: a bilinear pointer score e_ij between every query and key (one
pointer step for all edges at once, no recurrence), the k best edges into each query taken deterministically (the
argmax of the predictor, as the paper at inference), and e_ij added to the chosen edges' attention logits, so that the
predictor learns by backpropagation (the gradient reaches W_a, W_c through the chosen edges' scores) instead of by
policy gradient. Scoring every pair is n^2 r (the paper's pointers read all n nodes per edge too: O(n^2) for O(n)
edges): the op is quadratic in FLOPs, O(n k d) in the attention; the scores are taken without autograd in chunks of
C queries (topk.py's selection), so memory stays O(C n + n k d).

The paper's predictor emits a budget of edges for the whole graph (in-degrees free); here every query gets exactly k
(min(k, its allowed keys)), so that the attention is one batched gather.

Choices where the paper is silent: one graph for all heads (the K/V heads' keys gathered once, each query head of a
group reading them); ties at the k-th score broken by torch.topk; a padded key is never chosen, a query with fewer
than k allowed keys keeps them all; no position scheme inside (the edges carry no order); dropout= is refused.
Decoding keeps K, V and the edge keys c_j of every position; each new query chooses its k edges over them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from ...decode import slot
from ..registry import Op, OpEnv, register
from ._sac_cost import sac_cost
from .isab import no_dropout_shape
from .topk import TopkAttention, TopkParams


class SacParams(TopkParams):
    k: int = Field(8, ge=1, le=1 << 16, description="k: the edges chosen into each query")
    edge_dim: int = Field(16, ge=1, le=1 << 12, description="r: the edge predictor's width (a_i . c_j / sqrt(r))")


class SacAttention(TopkAttention):
    def __init__(self, p: SacParams, env: OpEnv):
        super().__init__(p, env)
        self.edge_dim = p.edge_dim
        self.edge_q = torch.nn.Linear(env.d, p.edge_dim, bias=False)  # a_i
        self.edge_k = torch.nn.Linear(env.d, p.edge_dim, bias=False)  # c_j

    def forward(self, x, ctx):
        b, T, _ = x.shape
        q, k, v = self.qkv(x)
        a, c = self.edge_q(x)[:, None], self.edge_k(x)[:, None]  # [b, 1, T, r]
        start, mask = 0, self.key_mask(ctx)
        if ctx is not None and ctx.cache is not None:  # decoding: the new queries against every cached position
            start, key = ctx.offset, slot(ctx, self)
            if key in ctx.cache.caches:
                k0, v0, c0 = ctx.cache.caches[key]
                k, v, c = torch.cat((k0, k), 2), torch.cat((v0, v), 2), torch.cat((c0, c), 2)
            ctx.cache.caches[key] = (k, v, c)
            mask = None
        idx, keep = self.select(a, c, start, mask)  # [b, 1, T, k]: the chosen edges (no autograd)
        return self.out(self.edges(q, k, v, a, c, idx[:, 0], keep[:, 0]))

    def edges(self, q, k, v, a, c, idx, keep):
        """q [b, h, T, dh]; k, v [b, kv, N, dh]; a [b, 1, T, r], c [b, 1, N, r]; idx, keep [b, T, k] -> o [b, h, T,
        dh]: each query against its k edges' keys, values and edge scores (one SDPA call, T k-key rows per K/V head)."""
        b, h, T, dh = q.shape
        kv, g, K = self.kv_heads, h // self.kv_heads, self.k
        bi = torch.arange(b, device=q.device)[:, None, None]
        e = (a[:, 0, :, None, :] * c[:, 0][bi, idx]).sum(-1) / math.sqrt(self.edge_dim)  # [b, T, k] the edge scores
        bias = e.masked_fill(~keep, float("-inf"))
        ki = torch.arange(kv, device=q.device)[None, :, None, None]
        kg, vg = k[bi[..., None], ki, idx[:, None]], v[bi[..., None], ki, idx[:, None]]  # [b, kv, T, k, dh]
        qr = q.view(b, kv, g, T, dh).transpose(2, 3).reshape(b * kv * T, 1, g, dh)
        mask = bias[:, None].expand(b, kv, T, K).reshape(b * kv * T, 1, 1, K)
        o = F.scaled_dot_product_attention(qr, kg.reshape(b * kv * T, 1, K, dh), vg.reshape(b * kv * T, 1, K, dh),
                                           attn_mask=mask)  # [b kv T, 1, g, dh]
        return o.reshape(b, kv, T, g, dh).transpose(2, 3).reshape(b, h, T, dh)


OP = register(Op(
    decode="K, V (kv_heads heads) and the edge keys c_j of every position; each new query chooses its k edges",
    family="mha", variant="sac", params=SacParams, module=SacAttention,
    causal="yes", shape=no_dropout_shape("mha(sac)"), supports=frozenset(),
    paper="SAC: Accelerating and Structuring Self-Attention via Sparse Adaptive Connection, Li et al. 2020, "
          "arXiv:2003.09833",
    summary="an edge predictor (bilinear pointer scores a_i . c_j of width r, every pair, no autograd, query chunks) "
            "chooses k edges into each query (causal: from the past); attention over the chosen edges with the edge "
            "score added to the logit (the predictor's gradient, in place of the paper's policy gradient): O(n^2 r) "
            "scoring, O(n k d) attention",
    note="", cost=sac_cost,  # no note in the reference; seed 002 lists it ([35])
))
