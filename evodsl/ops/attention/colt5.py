"""mha(colt5): CoLT5's conditional attention (Ainslie et al. 2023, its conditional attention layer):

    y_i = A_light(x_i, X) + lambda^q_i A_heavy(x_i, {lambda^kv_j x_j : j routed kv})    for routed queries i,
    y_i = A_light(x_i, X)                                                              elsewhere.

A_light is mha(local) with light_heads heads of the heavy heads' width dh (keys |i - j| < window: a band, as
LongT5's local attention; CoLT5's light attention has fewer heads). A_heavy is softmax attention with heads (and
kv_heads: GQA) of the k_q routed queries over the k_kv routed keys and values, its output projection included,
scaled by the query router's lambda^q. Two routers (ffn/_colt5_router.py: s = x u, soft top-k by bisection on
its threshold then in closed form, hard top-k by stable sort), one for the queries, one for the keys and values.
Where the paper is silent we follow its equation as written: the routed key/value tokens enter the heavy
projections scaled by their lambda^kv (so that the kv router learns; lucidrains scales the values only).
Both softmax pieces are F.scaled_dot_product_attention: the band as mha(local) runs it (_banded.py), the heavy
one on [k_q, k_kv] scores. k_q and k_kv are fixed numbers of tokens, clipped at n: the heavy branch costs
O(k_q k_kv d + (k_q + k_kv) d^2) whatever n, the light one O(n w d).

Bidirectional only (causal: no): the routers rank every token of the sequence, as CoLT5's encoder does. No
position scheme inside (a routed token's position would have to travel with it); dropout= is refused.
Padding: padded tokens get lambda 0 and are routed only where a row has fewer tokens than k (then as masked
keys, and queries at weight 0); the light band leaves padded keys out as mha(local) does.
Export (a symbolic n): k_q and k_kv slots whatever n, those past n pointing at token n - 1, masked as keys and at
weight 0 as queries (the router's export form), so that no axis depends on whether n < k.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from ..ffn._colt5_router import Router
from ..registry import Op, OpEnv, register
from ._colt5_cost import colt5_attention_cost
from ._common import AttentionBase, AttentionParams
from .isab import no_dropout_shape
from .local import LocalAttention, LocalAttentionParams


class CoLT5Params(AttentionParams):
    light_heads: int | None = Field(None, ge=1, le=4096, description="heads of the light (local) attention, "
                                                                       "each dh wide; default heads / 2")
    window: int = Field(128, ge=1, description="the light attention's band: keys |i - j| < window")
    k_q: int = Field(64, ge=1, le=1 << 20, description="routed queries per sequence (clipped at n)")
    k_kv: int = Field(64, ge=1, le=1 << 20, description="routed keys and values per sequence (clipped at n)")
    eps: float = Field(0.1, gt=0.0, le=100.0, description="the routers' soft top-k entropy weight (temperature)")


def light_params(p: CoLT5Params, dh: int) -> LocalAttentionParams:
    return LocalAttentionParams(heads=p.light_heads or max(1, p.heads // 2), head_dim=dh, bias=p.bias,
                                window=p.window)


class CoLT5Attention(AttentionBase):
    """q_proj, k_proj, v_proj, o_proj: the heavy attention's; light: an mha(local) module; q_router, kv_router."""

    def __init__(self, p: CoLT5Params, env: OpEnv):
        super().__init__(p, env)
        self.light = LocalAttention(light_params(p, self.head_dim), OpEnv(in_shapes=env.in_shapes))
        self.q_router = Router(env.d, p.k_q, p.eps)
        self.kv_router = Router(env.d, p.k_kv, p.eps)

    def forward(self, x, ctx):
        b, n, d = x.shape
        mask = self.key_mask(ctx)
        qi, lq, _ = self.q_router(x, mask)
        ki, lk, slots = self.kv_router(x, mask)  # slots: exported, the slots that are positions (k past n)
        keep = None if mask is None else mask.gather(1, ki)  # which routed keys are tokens: [b, K_kv]
        if slots is not None:
            keep = slots if keep is None else keep & slots
        heavy = self.heavy(self.rows(x, qi), self.rows(x, ki) * lk[..., None], keep) * lq[..., None]  # [b, Kq, d]
        y = self.light(x, ctx)
        heavy = heavy.to(y.dtype)  # under autocast the branches may differ (the light one's SDPA in bfloat16)
        if not isinstance(n, int):
            return y.scatter_add(1, qi[..., None].expand(-1, -1, d), heavy)
        flat = (qi + torch.arange(b, device=x.device)[:, None] * n).flatten()
        return y.view(b * n, d).index_add_(0, flat, heavy.reshape(-1, d)).view(b, n, d)

    @staticmethod
    def rows(x, idx):
        """x [b, n, d] at positions idx [b, K] -> [b, K, d]."""
        b, n, d = x.shape
        if not isinstance(n, int):
            return x.gather(1, idx[..., None].expand(-1, -1, d))
        flat = (idx + torch.arange(b, device=x.device)[:, None] * n).flatten()
        return x.reshape(b * n, d).index_select(0, flat).view(b, -1, d)

    def heavy(self, xq, xkv, keep):
        """Softmax attention of the routed queries xq [b, Kq, d] over the routed (scaled) tokens xkv [b, Kkv, d];
        keep bool [b, Kkv] (None: all) -> [b, Kq, d], o_proj applied."""
        b, kq, _ = xq.shape
        kk = xkv.shape[1]
        q = self.q_proj(xq).view(b, kq, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(xkv).view(b, kk, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(xkv).view(b, kk, self.kv_heads, self.head_dim).transpose(1, 2)
        mask = None if keep is None else keep[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.kv_heads != self.heads)
        return self.out(o)


OP = register(Op(
    decode=None,  # bidirectional only: the routers rank the whole sequence
    family="mha", variant="colt5", params=CoLT5Params, module=CoLT5Attention, causal="no",
    shape=no_dropout_shape("mha(colt5)"), supports=frozenset(),
    paper="CoLT5: Faster Long-Range Transformers with Conditional Computation, Ainslie et al. 2023, "
          "arXiv:2303.09752",
    summary="light local attention (light_heads, |i - j| < window) for every token + lambda^q_i softmax "
            "attention of the k_q routed queries over the k_kv routed (lambda^kv-scaled) tokens; "
            "O(n w d + k_q k_kv d)",
    note="MHA/LocalGlobal/006.md", cost=colt5_attention_cost,
))
