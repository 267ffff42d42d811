"""pos(deberta, k=256, share=false): DeBERTa's disentangled attention (He et al. 2020, §3.1), run inside every
mha(softmax) downstream; on the stream it is the identity. The score of query i for key j is

    A_ij = (q_i·k_j + q_i·Kr_δ(i,j) + k_j·Qr_δ(i,j)) / sqrt(3 dh),   δ(i, j) = clamp(i - j, -k, k - 1) + k,

content-to-content, content-to-position (c2p) and position-to-content (p2c), per head. P [2k, D] is one learned
table of relative embeddings (DeBERTa's encoder-level rel_embeddings, shared by every layer: it lives on the pos
node and reaches the attention layers through the Ctx, as T5's table); Kr = P W_kr, Qr = P W_qr + b_qr are each
layer's own projections of it (share=false, DeBERTa v1: pos_proj without a bias, pos_q_proj with one), or the
layer's own k_proj and q_proj (share=true, v2's share_att_key).

Where HF's DebertaModel differs from the paper, this follows HF, so that its weights give its outputs:
- p2c reads Qr at δ(i, j), not the paper's δ(j, i) (HF gathers at clamp(-(j - i)), the same index as c2p);
- the scale 1/sqrt(3 dh) (HF: 1 + len(pos_att_type) = 3) divides q before every term and Qr (never k);
  terms=c2p or terms=p2c keeps one position term (HF's pos_att_type), at 1/sqrt(2 dh);
- DeBERTa v1 has no key bias (q_bias, v_bias only): with key_bias=false (the default) the attention's k_proj
  loses its bias, so that a spec's parameters are DeBERTa's.
Choices where the paper is silent: the table is heads·head_dim wide (DeBERTa's hidden size equals it); with
grouped K/V heads p2c reads each query head's K/V head; only the 2·min(L, k) rows a sequence of L keys can reach
are projected (HF's att_span). Causal: the paper's model is an encoder, but every term reads only key j and the
distance i - j, so the causal mask keeps the future out exactly: causal form "yes", decoding against a K/V
cache with the distances counted from the absolute positions.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost
from ..registry import Op, OpEnv, OpParams, register, sequence_shape
from ._deberta_attention import DebertaRelative


class DebertaParams(OpParams):
    k: int = Field(256, ge=1, le=65536, description="relative distances clipped to [-k, k): a table of 2k rows")
    share: bool = Field(False, description="project the table with the layer's k_proj/q_proj (v2's share_att_key) "
                                           "instead of its own pos_proj/pos_q_proj (v1)")
    key_bias: bool = Field(False, description="keep the attention's k_proj bias (DeBERTa has q and v biases only)")
    terms: Literal["both", "c2p", "p2c"] = Field("both", description="the position terms (HF's pos_att_type); "
                                                    "the scale is 1/sqrt((1 + terms) dh)")


class DebertaTable(nn.Module):
    """The stream's side: the identity, which hands the relative embedding table P [2k, d] to the attention
    layers after it (ctx)."""

    def __init__(self, p: DebertaParams, env: OpEnv):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(2 * p.k, env.d).normal_(0.0, 0.02))

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        if ctx is not None:
            ctx.extra["deberta"] = self
        return x


OP = register(Op(
    decode="the disentangled scores of the new queries against every cached key",
    shape=sequence_shape, family="pos", variant="deberta", params=DebertaParams, module=DebertaTable,
    causal="yes", attach=DebertaRelative,
    attach_cost=lambda p, s, h, kv, dh: Cost(),  # its whole cost is the attention's (_deberta_cost.py)
    cost=lambda p, env, s: Cost(params=2 * p.k * s.d, inplace=True),  # the table, counted once; the identity
    paper="DeBERTa: Decoding-enhanced BERT with Disentangled Attention, He et al. 2020, arXiv:2006.03654",
    summary="A_ij = (q_i·k_j + q_i·Kr_δ(i,j) + k_j·Qr_δ(i,j)) / sqrt(3 dh), δ = clamp(i - j, -k, k - 1) + k, "
            "one table of 2k relative embeddings",
    note="Pe/002.md",
))
