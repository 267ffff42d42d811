"""mha(el): EL-attention (Yan et al. 2021, EL-Attention: Memory Efficient Lossless Attention for Generation,
arXiv:2105.04779): softmax attention with the key and value projections moved off the keys and values, so that
queries attend to the hidden states X themselves. Per head h (K/V head g(h) under grouped K/V heads):

    q'_h = q_h W_K^g^T                                   (the query expanded to width d)
    o_h  = softmax(q'_h X^T / sqrt(dh)) X W_V^g^T + b_V^g
    out  = [o_1 .. o_H] W_O^T + b_O

which is mha(softmax) exactly: q_h k_j^T = q_h (W_K^g x_j + b_K^g) = q'_h . x_j + q_h . b_K^g, and the second term is
the same for every key of a row, so the softmax drops it (the key bias needs nothing; it cannot change the weights);
the weights of a row sum to 1, so the value bias comes out of the sum. The parameters are mha(softmax)'s (q, k, v, o
projections, kv_heads); K and V are never computed, and a decoder caches X alone: [b, n, d] per layer, where
mha(softmax) caches K and V, 2 [b, n, kv dh] (half at kv_heads = heads; equal at kv_heads = heads / 2; GQA below
that caches less than EL).

Choices where the paper is silent or says otherwise: the paper folds W_V^h W_O^h into one [d, d] map per head; here
the value projection is applied to each head's [n, d] output and o_proj after it (the same product, fewer FLOPs:
2 n d dh per head, not 2 n d^2). The queries are expanded by a batched matmul over the heads (a K/V head's W_K shared
by its query heads). The attention itself is SDPA with the [b, h, n, d] expanded queries against X as one shared K/V
head (keys = values = X), scale 1/sqrt(dh). Causal: SDPA's causal mask; decoding appends X to the cache and reads
it as the keys and values. Padding: SDPA's mask, as mha(softmax). No position scheme inside attention: rope turns
the projected keys by position (not foldable into the query), ALiBi is not offered; dropout= is refused.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...decode import slot
from ..registry import Op, OpEnv, register
from ._common import AttentionBase, AttentionParams
from ._el_cost import el_cost
from .isab import no_dropout_shape


class ELAttention(AttentionBase):
    def __init__(self, p: AttentionParams, env: OpEnv):
        super().__init__(p, env)
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def _per_head(self, w: torch.Tensor) -> torch.Tensor:
        """A K/V projection's weight [kv dh, d] -> [h, dh, d]: each query head's K/V head."""
        w = w.view(self.kv_heads, self.head_dim, -1)
        g = self.heads // self.kv_heads
        return w if g == 1 else w.repeat_interleave(g, dim=0)

    def expand_query(self, x: torch.Tensor) -> torch.Tensor:
        """q'_h = q_h W_K^g^T: [b, n, d] -> [b, h, n, d] (laid out [h, b, n, d])."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b * n, self.heads, self.head_dim).transpose(0, 1)  # [h, b n, dh]
        return torch.bmm(q, self._per_head(self.k_proj.weight)).view(self.heads, b, n, -1).transpose(0, 1)

    def project_out(self, o: torch.Tensor) -> torch.Tensor:
        """o_h W_V^g^T + b_V^g, then o_proj: [b, h, n, d] -> [b, n, d]."""
        b, h, n, d = o.shape
        wv = self._per_head(self.v_proj.weight).transpose(1, 2)  # [h, d, dh]
        oh = o.transpose(0, 1).reshape(h, b * n, d)
        if self.v_proj.bias is None:
            v = torch.bmm(oh, wv)
        else:
            bias = self._per_head(self.v_proj.bias[:, None])  # [h, dh, 1]
            v = torch.baddbmm(bias.transpose(1, 2), oh, wv)
        return self.o_proj(v.view(h, b, n, self.head_dim).permute(1, 2, 0, 3).reshape(b, n, h * self.head_dim))

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        n = x.shape[1]
        kv = x.unsqueeze(1)  # one K/V head: the hidden states
        mask = self.allowed(ctx, n, x.device)
        o = F.scaled_dot_product_attention(self.expand_query(x), kv, kv, attn_mask=mask, is_causal=self.causal and mask is None,
                                           scale=self.scale, enable_gqa=True)
        return self.project_out(o)

    def _step(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """Decoding: the new positions' expanded queries against X of every position so far (the cache: X alone)."""
        start, n = ctx.offset, x.shape[1]
        key = slot(ctx, self)
        old = ctx.cache.caches.get(key)
        xs = x if old is None else torch.cat((old, x), dim=1)
        ctx.cache.caches[key] = xs
        mask = None
        if start and n > 1:  # a chunk after the cache: the causal mask aligned at the end
            i, j = torch.arange(start, start + n, device=x.device), torch.arange(start + n, device=x.device)
            mask = j[None, :] <= i[:, None]
        kv = xs.unsqueeze(1)
        o = F.scaled_dot_product_attention(self.expand_query(x), kv, kv, attn_mask=mask,
                                           is_causal=self.causal and mask is None and not start, scale=self.scale,
                                           enable_gqa=True)
        return self.project_out(o)


OP = register(Op(
    decode="the hidden states X of every position so far ([b, n, d]: no K, no V)",
    family="mha", variant="el", params=AttentionParams, module=ELAttention,
    causal="yes", shape=no_dropout_shape("mha(el)"), supports=frozenset(),
    paper="EL-Attention: Memory Efficient Lossless Attention for Generation, Yan et al. 2021, arXiv:2105.04779",
    summary="softmax(q_h W_K^T X^T / sqrt(dh)) X W_V^T per head: mha(softmax) with W_K folded into the query and "
            "W_V applied after the sum; keys = values = X (the decoding cache holds X, not K and V)",
    cost=el_cost, note="MHA/Others/008.md",
))
