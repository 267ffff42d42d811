"""pos(deberta) inside mha(softmax): the disentangled scores as SDPA's float mask (deberta.py has the equation).

q is scaled by 1/sqrt(3 dh) first (HF's order), so q·k, c2p and p2c all carry the scale and SDPA runs at scale 1.
c2p = q Kr^T [b, h, n, 2s] and p2c = k Qr^T [b, h, L, 2s] are computed against the 2s = 2 min(L, k) rows a
sequence of L keys can reach, then gathered at δ(i, j) into [b, h, n, L]: their sum is the mask (with -inf where
a key is padded or, causal, in the future). The mask has a gradient, so in training SDPA runs its math kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import ShapeProblem
from ._deberta_cost import deberta_attention_cost
from ._inattention import InAttentionPosition, refuse_own_score_options


def check_deberta(p, env) -> None:
    """mha(softmax)'s options that have no place in DeBERTa's attention, refused."""
    d = env.d
    width = p.heads * (p.head_dim or d // p.heads)
    if width != d:
        raise ShapeProblem(f"pos(deberta)'s table is d_model={d} wide, but the attention's heads x head_dim is "
                           f"{width}", "head_dim", "pos(deberta) needs heads x head_dim = d_model: drop head_dim=")
    refuse_own_score_options(p, env, "pos(deberta)", "(q·k + c2p + p2c) / sqrt(3 dh)")


class DebertaRelative(InAttentionPosition):
    """Inside attention: the layer's projections of the table bound by the latest pos(deberta) upstream."""

    attends = True  # mha(softmax) hands its forward to attend(), its cost to attention_cost, its checks to check
    attention_cost = staticmethod(deberta_attention_cost)
    check = staticmethod(check_deberta)

    def __init__(self, p, heads: int, head_dim: int):
        super().__init__()
        self.k, self.share, self.key_bias = p.k, p.share, p.key_bias
        self.c2p, self.p2c = p.terms in ("both", "c2p"), p.terms in ("both", "p2c")
        self.heads, self.head_dim = heads, head_dim
        self.scale = ((1 + self.c2p + self.p2c) * head_dim) ** -0.5  # HF: 1 + len(pos_att_type)
        width = heads * head_dim
        if not p.share and self.c2p:
            self.pos_proj = nn.Linear(width, width, bias=False)  # Kr = P W_kr
        if not p.share and self.p2c:
            self.pos_q_proj = nn.Linear(width, width)  # Qr = P W_qr + b_qr
        self.__dict__["_table"] = None  # a reference, not a submodule: the table belongs to the pos node

    def adopt(self, att) -> None:
        """Called by the attention once built: DeBERTa's attention has no key bias."""
        if not self.key_bias and att.k_proj.bias is not None:
            att.k_proj.register_parameter("bias", None)

    def bind(self, ctx) -> None:
        self.__dict__["_table"] = None if ctx is None else ctx.extra.get("deberta")

    def relative(self, att, rows: torch.Tensor):
        """Kr [h, 2s, dh] and Qr [h, 2s, dh] (Qr scaled) of the table rows (None for a term not computed)."""
        kr = qr = None
        if self.c2p:
            kr = (att.k_proj if self.share else self.pos_proj)(rows)
            kr = kr.view(rows.shape[0], -1, self.head_dim).transpose(0, 1)
            g = self.heads // kr.shape[0]  # share=true with K/V heads: each serves its group of query heads
            kr = kr if g == 1 else kr.repeat_interleave(g, dim=0)
        if self.p2c:
            qr = (att.q_proj if self.share else self.pos_q_proj)(rows)
            qr = qr.view(rows.shape[0], -1, self.head_dim).transpose(0, 1) * self.scale
        return kr, qr

    def scores(self, att, q: torch.Tensor, k: torch.Tensor, start) -> torch.Tensor:
        """c2p + p2c [b, h, n, L] for (scaled) queries at positions start.. against keys 0..L-1."""
        if self._table is None:
            raise RuntimeError("pos(deberta): no table bound; the pos(deberta) op runs before its attention layers")
        b, h, n, _ = q.shape
        L = k.shape[2]
        s = torch.sym_min(L, self.k)  # the distances L keys can reach, clipped to k (no branch on L: export)
        rows = torch.arange(self.k - s, self.k + s, device=q.device)  # a lookup: the projections keep only these
        kr, qr = self.relative(att, F.embedding(rows, self._table.weight))
        i = torch.arange(n, device=q.device)[:, None] + start
        j = torch.arange(L, device=q.device)[None, :]
        delta = (i - j).clamp(-s, s - 1) + s  # [n, L], indices into the 2s rows
        c2p = p2c = None
        if self.c2p:
            c2p = (q @ kr.transpose(-1, -2)).gather(-1, delta.expand(b, h, n, L))
        if self.p2c:
            p2c = (att.expand_kv(k) @ qr.transpose(-1, -2)).gather(-1, delta.t().expand(b, h, L, n)).transpose(-1, -2)
        return p2c if c2p is None else c2p if p2c is None else c2p.add_(p2c)

    def attend(self, att, x: torch.Tensor, ctx) -> torch.Tensor:
        self.bind(ctx)
        start = 0
        q, k, v = att.qkv(x)
        q = q * self.scale
        n = x.shape[1]
        if ctx is not None and ctx.cache is not None:  # decoding: the new queries against every cached key
            from ...decode import append_kv
            start = ctx.offset
            k, v = append_kv(ctx, att, k, v)
            keep = None
        else:
            keep = att.allowed(ctx, n, x.device)  # padding (and the causal mask with it), or None
        mask = self.scores(att, q, k, start)
        if keep is None and att.causal:
            i = torch.arange(n, device=x.device)[:, None] + start
            keep = torch.arange(k.shape[2], device=x.device)[None, :] <= i
        if keep is not None:
            mask = mask.masked_fill_(~keep, float("-inf"))
        drop = att.dropout if att.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=1.0,
                                           enable_gqa=att.kv_heads != att.heads)
        return att.out(o)
