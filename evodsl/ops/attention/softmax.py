"""mha(softmax): scaled dot-product attention, softmax(Q K^T / sqrt(dh)) V per head.

Lowers to F.scaled_dot_product_attention. With kv_heads=1 it is multi-query attention (Shazeer 2019), with
1 < kv_heads < heads grouped-query attention (Ainslie et al. 2023). Inside residual(..., scores=true) it is
RealFormer's residual attention (He et al. 2020): the raw scores of the previous such layer are added before
the softmax, so the scores are materialized (O(n^2) memory, as the method requires).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..registry import Op, OpEnv, register
from ._common import AttentionBase, AttentionParams, attention_shape


class SoftmaxAttentionParams(AttentionParams):
    pass


class SoftmaxAttention(AttentionBase):
    def __init__(self, p: SoftmaxAttentionParams, env: OpEnv):
        super().__init__(p, env)
        self.residual_scores = env.residual_scores

    def _bias(self, n: int, device) -> torch.Tensor | None:
        idx = torch.arange(n, device=device)
        bias = self.position_bias(idx[:, None], idx[None, :])
        if bias is not None and self.causal:
            bias = bias.masked_fill(idx[None, :] > idx[:, None], float("-inf"))
        return bias

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        q, k, v = self.qkv(x)
        n = x.shape[1]
        drop = self.dropout if self.training else 0.0
        if self.residual_scores:
            return self.out(self._residual_scores(q, k, v, ctx, drop))
        bias = self._bias(n, x.device)
        if bias is not None:
            bias = bias.to(q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop,
                                           is_causal=self.causal and bias is None,
                                           enable_gqa=self.kv_heads != self.heads)
        return self.out(o)

    def _residual_scores(self, q, k, v, ctx, drop):
        scores = q @ self.expand_kv(k).transpose(-1, -2) / math.sqrt(self.head_dim)
        if ctx.scores is not None:
            scores = scores + ctx.scores
        ctx.scores = scores
        n = q.shape[2]
        bias = self._bias(n, q.device)
        s = scores if bias is None else scores + bias
        if self.causal and bias is None:
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        w = F.dropout(s.softmax(-1), drop)
        return w @ self.expand_kv(v)


OP = register(Op(
    family="mha", variant="softmax", params=SoftmaxAttentionParams, module=SoftmaxAttention,
    causal="yes", shape=attention_shape, supports=frozenset({"rope", "alibi", "residual_scores"}),
    paper="Attention Is All You Need, Vaswani et al. 2017, arXiv:1706.03762",
    summary="softmax(Q K^T / sqrt(dh)) V per head; kv_heads < heads shares K/V heads (MQA/GQA)",
    note="README.md; Head/002.md (MQA)",
))
