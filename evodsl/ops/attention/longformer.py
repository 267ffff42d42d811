"""mha(longformer, window=w, globals=g, dilation=d): Longformer (Beltagy, Peters & Cohan 2020), as HF's
LongformerSelfAttention: a sliding window of w + 1 keys (w even, HF's attention_window), optionally dilated,
plus g global tokens.

With s_tr = q_t . k_r / sqrt(dh), per head,

    window:  W(t) = {t + d j : |j| <= w/2} within 0 .. n-1      (causal: j = -w/2 .. 0)
    local query t >= g:   o_t = sum_{r in G u (W(t) - G)} softmax_r(s_tr) v_r,     G = {0 .. g-1}
    global query t < g:   o_t = sum_{r < n} softmax_r(qg_t . kg_r / sqrt(dh)) vg_r

one softmax over the window and the global keys (a global position inside a window counts once, as a global
key); the global queries attend every key with their own projections query_global, key_global, value_global
(qg, kg, vg; created only when g > 0). The output projection o_proj is shared. HF marks global tokens per
input (global_attention_mask); here they are the first g positions of every sequence, fixed by the spec
(CLS-style: globals=1 is HF's classification setting). Padded keys leave every window and the global rows;
padded query rows are finite and meaningless. Left padding with g > 0 would put padding where the global tokens
are: refused (E409). The causal form (g = 0 only) looks back only: keys t - d j, j = 0 .. w/2.

Computed in O(n (w + g)): the window by blocks (d = 1, g = 0: _banded.banded_attention; else
_dilated_band.dilated_band), the global rows as one [g x n] SDPA call. rope/alibi are not declared (HF has
none): the validator refuses them.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ..registry import Op, OpEnv, ShapeProblem, register, require_right_padding
from ._banded import banded_attention
from ._common import AttentionBase, AttentionParams, attention_shape
from ._dilated_band import dilated_band
from ._longformer_cost import longformer_cost


class LongformerParams(AttentionParams):
    window: int = Field(512, ge=2, le=1 << 20, description="w (even): keys t + d j, |j| <= w/2 (HF's attention_window)")
    globals: int = Field(0, ge=0, le=1 << 16, description="g: the first g positions attend and are attended by all")
    dilation: int = Field(1, ge=1, le=1 << 10, description="d: the window's step (the paper's dilated window)")


def longformer_shape(p: LongformerParams, env: OpEnv):
    shape = attention_shape(p, env)
    if p.window % 2:
        raise ShapeProblem(f"window={p.window} is odd", "window",
                           f"the window is w/2 keys each side of the query and the query's own: use window="
                           f"{p.window - 1} or {p.window + 1} (HF's attention_window is even)")
    if env.causal and p.globals:
        raise ShapeProblem(f"mha(longformer) with globals={p.globals} has no causal form: a global token reads "
                           "every position and every position reads it", "globals",
                           "set globals=0 in a causal model (the window then looks back only: keys t - d j, "
                           "j = 0 .. w/2)")
    return shape


class LongformerAttention(AttentionBase):
    def __init__(self, p: LongformerParams, env: OpEnv):
        super().__init__(p, env)
        self.half, self.globals, self.dilation = p.window // 2, p.globals, p.dilation
        if p.globals:  # the global queries' own projections (HF's query_global, key_global, value_global)
            d, hd, kvd = env.d, self.heads * self.head_dim, self.kv_heads * self.head_dim
            self.query_global = nn.Linear(d, hd, bias=p.bias)
            self.key_global = nn.Linear(d, kvd, bias=p.bias)
            self.value_global = nn.Linear(d, kvd, bias=p.bias)

    def forward(self, x, ctx):
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        key_mask = self.key_mask(ctx)
        g = min(self.globals, x.shape[1]) if isinstance(x.shape[1], int) else self.globals
        if g:
            require_right_padding(key_mask, f"mha(longformer) with globals={self.globals}",
                                  "its global tokens are the first positions, and left padding puts padding there",
                                  hint="pad after the tokens (tokenizer padding_side='right'), or set globals=0")
        q, k, v = self.qkv(x)
        k, v = self.expand_kv(k), self.expand_kv(v)
        dropout = self.dropout if self.training else 0.0
        lo, hi = self.half, 0 if self.causal else self.half
        if g == 0 and self.dilation == 1:
            y = self.out(banded_attention(q, k, v, lo, hi, dropout=dropout, key_mask=key_mask))
        else:
            y = self.o_proj(dilated_band(q, k, v, lo, hi, self.dilation, g, dropout, key_mask))
        del q, k, v
        if g:  # the global rows, written over o_proj's output (which its backward does not keep)
            y[:, :g] = self._global_rows(x, g, key_mask, dropout)
        return y

    def _global_rows(self, x, g: int, key_mask, dropout: float):
        """o_proj(softmax(qg kg^T / sqrt(dh)) vg) for the g global queries against all n keys: [b, g, d]."""
        b, n, _ = x.shape
        h, kv, dh = self.heads, self.kv_heads, self.head_dim
        qg = self.query_global(x[:, :g]).view(b, g, h, dh).transpose(1, 2)
        kg = self.key_global(x).view(b, n, kv, dh).transpose(1, 2)
        vg = self.value_global(x).view(b, n, kv, dh).transpose(1, 2)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        o = nn.functional.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, dropout_p=dropout,
                                                       enable_gqa=kv != h)
        return self.out(o)

    def _step(self, x, ctx):
        """Decoding (causal, g = 0): each new query reads keys t - d j, j = 0 .. w/2; the cache keeps the last
        d w/2 + 1 positions (the other residues' queries read those the dilation skips)."""
        d = self.dilation
        if d == 1:
            return self.window_step(x, ctx, self.half + 1)
        return self.window_step(x, ctx, d * self.half + 1,  # the keys between the window's: -inf
                                lambda i, j: torch.where((i - j) % d == 0, 0.0, float("-inf")).unsqueeze(0))


OP = register(Op(
    decode="a cache of the last d w/2 + 1 keys and values (kv_heads heads); causal only with globals=0",
    family="mha", variant="longformer", params=LongformerParams, module=LongformerAttention,
    causal="yes", shape=longformer_shape, cost=longformer_cost,
    paper="Longformer: The Long-Document Transformer, Beltagy, Peters & Cohan 2020, arXiv:2004.05150",
    summary="softmax(q_t K^T / sqrt(dh)) V over the window t + d j, |j| <= w/2 (causal j <= 0), and the "
            "first g positions (global: their own projections, every key); O(n (w + g))",
    note="",
))
