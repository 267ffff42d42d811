"""mha(fixed, pattern=P): hand-crafted, input-independent attention (Wu et al. 2020, Input-independent Attention
Weights Are Expressive Enough: A Study of Attention in Self-supervised Audio Transformers, arXiv:2006.05174, first
titled "Hand-crafted Attention is All You Need?"). No queries, no keys, no q.k: each head's weights A are a fixed
map of positions, and

    o_h = A_P V_h        (V_h = X W_V^h + b_V^h),        out = [o_1 .. o_H] W_O^T + b_O

The paper sorts the maps its audio Transformers learn into a few cases (attending to the token itself and its
neighbours: diagonal and local; to the previous or next frame; to every frame alike: global; to the same few frames
from every query: vertical) and replaces the learned maps by hand-crafted ones. The patterns here, each row uniform
over its set of keys (our choice where the paper gives shapes, not numbers):

    diagonal   A_ij = [j = i]
    local      j in i-w .. i+w  (window=w; the rows at the ends hold fewer keys)
    prev       j = i-1  (position 0 reads itself)           next   j = i+1  (the last position reads itself)
    global     every j                                      vertical   the first g positions (globals=g)
    mixed      head h takes (local, prev, next, global, vertical)[h mod 5]: one pattern per head

Causal: each pattern restricted to j <= i, rows renormalised over what is left (local: i-w .. i; global: the
cumulative mean; vertical: the first min(i+1, g) positions); `next` keeps nothing in the past, and its causal form is
the token itself (the nearest key it may read: our choice). Every pattern runs without an n x n tensor: shifted copies
of V (prev, next; local: 2w+1 of them summed, O(n w d)), a mean or cumulative sum over positions (global, vertical,
O(n d)): every pattern is linear in n. Padding: padded keys get no weight (local and global count only the real keys,
prev and next read their own token when the neighbour is padding, vertical reads the first g real tokens), so a
padded batch equals each sequence alone on either side. Grouped K/V heads: V has kv_heads heads, each read by its
group of query heads (with one pattern for every head, the group's outputs are one and the same). The parameters:
v_proj and o_proj alone (no q, k). Decoding keeps what the patterns reach (_fixed_step.py): V of the last w positions
(local; prev: the last one) and running sums of V (global: every position; vertical: the first g), O(w) per step.
dropout= is refused (no weights are formed to drop out).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..registry import Op, OpEnv, ShapeProblem, register
from ._common import AttentionParams, attention_shape
from ._fixed_cost import fixed_cost
from ._fixed_step import fixed_step

MIXED = ("local", "prev", "next", "global", "vertical")


class FixedParams(AttentionParams):
    pattern: Literal["mixed", "diagonal", "local", "prev", "next", "global", "vertical"] = Field(
        "mixed", description="the fixed map of every head; mixed: head h takes (local, prev, next, global, vertical)[h % 5]")
    window: int = Field(2, ge=0, le=1 << 12, description="local: each query reads keys i-w .. i+w")
    globals: int = Field(1, ge=1, le=1 << 16, description="vertical: every query reads the first g positions")


def head_patterns(p: FixedParams, causal: bool) -> list[str]:
    """The pattern of each query head (causal: next is the token itself)."""
    pats = [MIXED[i % len(MIXED)] if p.pattern == "mixed" else p.pattern for i in range(p.heads)]
    return ["diagonal" if causal and q == "next" else q for q in pats]


class FixedAttention(nn.Module):
    def __init__(self, p: FixedParams, env: OpEnv):
        super().__init__()
        d = env.d
        self.heads, self.kv_heads = p.heads, p.kv_heads or p.heads
        self.head_dim = p.head_dim or d // p.heads
        self.causal, self.window, self.globals = env.causal, p.window, p.globals
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=p.bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=p.bias)
        pats = head_patterns(p, env.causal)
        self.groups = {q: [i for i, r in enumerate(pats) if r == q] for q in dict.fromkeys(pats)}  # in head order
        order = [i for heads in self.groups.values() for i in heads]
        self.register_buffer("inverse", torch.tensor([order.index(i) for i in range(self.heads)]), persistent=False)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        b, n, _ = x.shape
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim)
        if ctx is not None and ctx.cache is not None:  # decoding: the window and running sums (_fixed_step.py)
            o = fixed_step(self, v, ctx)
        else:
            mask = None
            if ctx is not None and ctx.mask is not None and not (self.causal and ctx.right_padded):
                mask = ctx.mask
            o = self.mix(v, mask)
        return self.o_proj(o.reshape(b, o.shape[1], self.heads * self.head_dim))

    def mix(self, v: torch.Tensor, mask) -> torch.Tensor:
        """v [b, n, kv, dh] -> each query head's A_P V [b, n, h, dh]."""
        g = self.heads // self.kv_heads
        if len(self.groups) == 1:  # one pattern: on the K/V heads, then each one's group
            (pat,) = self.groups
            o = self.attend(pat, v, mask)
            return o if g == 1 else o.repeat_interleave(g, dim=2)
        vh = v if g == 1 else v.repeat_interleave(g, dim=2)
        outs = [self.attend(pat, vh[:, :, heads], mask) for pat, heads in self.groups.items()]
        return torch.cat(outs, dim=2)[:, :, self.inverse]

    def attend(self, pat: str, v: torch.Tensor, mask) -> torch.Tensor:
        """A_pat v for v [b, n, H, dh]; mask: bool [b, n] (True = a token) or None."""
        if pat == "diagonal":
            return v
        if pat in ("prev", "next"):  # V shifted one place (a padded copy, sliced: no slice of length n - 1, which
            # an export with a symbolic n would specialize on); the row without that neighbour reads its own token
            n = v.shape[1]
            ends = (1, 0) if pat == "prev" else (0, 1)
            s = F.pad(v, (0, 0, 0, 0, *ends))
            s = s[:, :n] if pat == "prev" else s[:, 1:]
            if mask is None:
                i = torch.arange(n, device=v.device)
                ok = (i > 0 if pat == "prev" else i < n - 1)[None]
            else:
                ok = F.pad(mask, ends, value=False)
                ok = ok[:, :n] if pat == "prev" else ok[:, 1:]
            return torch.where(ok[:, :, None, None], s, v)
        if pat == "local":
            return self._local(v, mask)
        n = v.shape[1]
        w = mask.to(v.dtype) if mask is not None else None
        if pat == "vertical":  # the first g real tokens
            rank = torch.arange(n, device=v.device)[None] if mask is None else mask.long().cumsum(1) - 1
            first = (rank < self.globals).to(v.dtype)
            w = first if w is None else w * first
        if self.causal:  # the cumulative mean over the keys so far
            num = (v if w is None else v * w[:, :, None, None]).cumsum(1)
            count = (torch.arange(1, n + 1, device=v.device, dtype=v.dtype)[None] if w is None else w.cumsum(1))
            return num / count.clamp(min=1)[:, :, None, None]
        b, _, h, dh = v.shape
        if w is None:
            w = torch.ones(1, n, dtype=v.dtype, device=v.device)
        w = w / w.sum(1, keepdim=True).clamp(min=1)
        o = torch.matmul(w[:, None, :], v.reshape(b, n, h * dh))  # [b, 1, h dh]: the mean over the keys
        return o.view(b, 1, h, dh).expand(b, n, h, dh).clone()  # laid out as every pattern's: o_proj reads it in place

    def _local(self, v: torch.Tensor, mask) -> torch.Tensor:
        """The band: sums of 2w+1 (causal: w+1) shifted copies of V over the real keys among them."""
        b, n, h, dh = v.shape
        w = self.window
        right = 0 if self.causal else w
        vm = v if mask is None else v * mask[:, :, None, None].to(v.dtype)
        vp = F.pad(vm, (0, 0, 0, 0, w, right))
        acc = vp[:, 0:n].clone()
        for o in range(1, w + right + 1):
            acc += vp[:, o:o + n]
        if mask is None:
            i = torch.arange(n, device=v.device)
            last = i if self.causal else torch.clamp(i + w, max=n - 1)
            count = (last - torch.clamp(i - w, min=0) + 1).to(v.dtype)[None]
        else:
            mp = F.pad(mask.to(v.dtype), (w, right))
            count = sum(mp[:, o:o + n] for o in range(w + right + 1))
        return acc.div_(count.clamp(min=1)[:, :, None, None])  # a padded query alone: 0


def fixed_shape(p: FixedParams, env: OpEnv):
    if p.dropout:
        raise ShapeProblem("mha(fixed) forms no attention weights, so it has none to drop out", "dropout",
                           "remove dropout=, or put dropout(standard) on the stream")
    return attention_shape(p, env)


OP = register(Op(
    decode="V of the last w positions (local; prev: the last one) and the running sums of V (global: all; vertical: "
           "the first g), kv_heads heads",
    family="mha", variant="fixed", params=FixedParams, module=FixedAttention,
    causal="yes", shape=fixed_shape, supports=frozenset(),
    paper="Input-independent Attention Weights Are Expressive Enough: A Study of Attention in Self-supervised Audio "
          "Transformers (Hand-crafted Attention is All You Need?), Wu et al. 2020, arXiv:2006.05174",
    summary="A_P V per head, A_P a fixed map of positions (no q.k): diagonal, local (i-w .. i+w), prev, next, global "
            "(mean), vertical (the first g), or mixed (one per head); causal: restricted to j <= i, rows renormalised; "
            "O(n w d) or O(n d)",
    cost=fixed_cost, note="",
))
