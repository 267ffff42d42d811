"""mha(local): sliding-window attention, each query attends only the keys within `window` positions of it.

With w = window and s_tr = q_t . k_r / sqrt(dh) (scale=s: q_t . k_r * s) (+ the ALiBi bias, if any), per head

    o_t = sum_{r in W(t)} softmax_{r in W(t)}(s_tr) v_r,
    causal:        W(t) = {r : t-w+1 <= r <= t}      (w keys, the query's own included)
    bidirectional: W(t) = {r : |t-r| < w}            (2w-1 keys)

clipped to 0 .. n-1. Xiong et al. 2021 find this plain local attention competitive with the sparse and
low-rank schemes on long-context tasks. Computed blockwise (see _banded.py): O(n * w) time and memory.
Speed against causal SDPA (mha(softmax), BENCHMARKS.md "bench_band", one CPU thread): faster up to w = n/2
(0.33x at n = 4096, w = 123; 0.93-0.96x at w = n/2), SDPA itself at w >= n, but 1.09-1.13x slower for 0.6 n < w
< n: there the band keeps over 85% of causal attention's scores, and no exact split of them (masked key blocks;
three unmasked calls merged by their log-sum-exps through a private ATen kernel, 1.04-1.08x) runs faster than
the fused causal kernel, which skips the upper triangle at full speed.
With softcap= (Gemma 2), sinks= (StreamingLLM), sink_logit= (gpt-oss) or talking= (talking heads) it runs the
explicit-score kernel of _scored.py instead (_softcap.py, _sinks.py, _talking.py say what each does and what it
refuses). collab=D_k (collaborative heads, _collab.py) shares the query and key projections between the heads and
runs the same band: q [q * m_i, e_i] and the shared key [k, x W_c] at one width W (the banded kernel's SDPA scale
1/sqrt(W) undone on q: q * sqrt(W) * scale, scale sqrt(D_k / h)^-1 by default); decoding caches that key per value
head beside the values, the last w of each.
"""
from __future__ import annotations

import math
from dataclasses import replace

from pydantic import Field

from ..cost import Cost, Symbols
from ..registry import Op, OpEnv, register
from ._banded import banded_attention, banded_attention_cost
from ._collab import CollabParams, check_collab, collab_qkv, collab_scale, collab_width
from ._collab_cost import collab_local_cost
from ._common import AttentionBase, AttentionParams, attention_shape
from ._scored import head_scale, scored_forward
from ._scored_cost import scored_cost
from ._sinks import SinksParams, sink_logit
from ._softcap import SoftcapParams, check_modifiers, modifiers
from ._talking import TalkingParams, talking_heads, talking_width


class LocalAttentionParams(SoftcapParams, SinksParams, TalkingParams, CollabParams, AttentionParams):
    window: int = Field(128, ge=1, description="w: causal, keys t-w+1 .. t; bidirectional, keys |t-r| < w")
    scale: float | None = Field(None, gt=0, description="score scale; default 1/sqrt(head_dim) (Gemma 2: "
                                                        "query_pre_attn_scalar^-1/2)")


class LocalAttention(AttentionBase):
    def __init__(self, p: LocalAttentionParams, env: OpEnv):
        super().__init__(p, env)
        self.window = p.window
        # softcap=, sinks=, sink_logit=: the explicit-score kernel (_scored.py)
        self.modified, self.variant, self.sinks = bool(modifiers(p)), "local", p.sinks
        self.softcap, self.sink_logit = p.softcap, sink_logit(p, talking_width(p, self.heads))  # H with talking=
        self.talking = talking_heads(p, self.heads)  # talking=: P_l, P_w (_talking.py)
        self.score_scale = head_scale(self.head_dim, p.scale)
        # scale= on the SDPA paths (band, decoding step): q pre-multiplied by scale * sqrt(dh), as SDPA then
        # multiplies by 1/sqrt(dh); the explicit-score kernel takes the scale itself
        self.q_factor = 1.0 if p.scale is None or self.modified else p.scale * math.sqrt(self.head_dim)
        if self.collab is not None:  # collab=: q at width W, SDPA's 1/sqrt(W) undone, the collab scale applied
            self.q_factor = collab_scale(self, p.scale) * math.sqrt(collab_width(self))

    def qkv(self, x, offset: int = 0):
        if self.collab is not None:  # the factor folded into m_i and e_i
            return collab_qkv(self, x, self.q_factor)
        q, k, v = super().qkv(x, offset)
        return (q if self.q_factor == 1.0 else q * self.q_factor), k, v

    def forward(self, x, ctx):
        if self.modified:
            return scored_forward(self, x, ctx)
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        q, k, v = self.qkv(x)
        lo = self.window - 1
        bias = self.position_bias if self.pos is not None else None
        o = banded_attention(q, self.expand_kv(k), self.expand_kv(v), lo, 0 if self.causal else lo, bias,
                             dropout=self.dropout if self.training else 0.0, key_mask=self.key_mask(ctx))
        return self.out(o)


    def _step(self, x, ctx):
        """Decoding (causal): each new query reads the last w positions; the cache keeps their K/V."""
        return self.window_step(x, ctx, self.window)


def local_attention_cost(p: LocalAttentionParams, env: OpEnv, s: Symbols) -> Cost:
    """The band of w keys back (and, bidirectional, ahead); decoding keeps the last w keys and values."""
    if modifiers(p):
        return scored_cost(p, env, s)
    if p.collab:
        return collab_local_cost(p, env, s)
    w = s.sym("w", p.window)
    cost = banded_attention_cost(p, env, s, lo=w - 1, hi=0 if env.causal else w - 1, cache_keys=w)
    if p.scale is None:
        return cost
    h = s.sym("h", p.heads)
    q = s.b * s.n * (s.d if p.head_dim is None else h * s.sym("dh", p.head_dim))  # scale=: q * scale sqrt(dh)
    return replace(cost, fwd_other=cost.fwd_other + q, bwd_other=cost.bwd_other + q)


def local_shape(p: LocalAttentionParams, env: OpEnv):
    check_modifiers("mha(local)", p, env)
    check_collab("mha(local)", p, env, modifiers(p))
    return attention_shape(p, env)


OP = register(Op(
    decode=lambda p: ("a cache of the first S keys and values (the sinks) and the last w (kv_heads heads)"
                      if p.sinks else "a cache of the last w keys and values (kv_heads heads)"),
    family="mha", variant="local", params=LocalAttentionParams, module=LocalAttention,
    causal="yes", shape=local_shape, supports=frozenset({"rope", "xpos", "alibi"}),
    paper="Simple Local Attentions Remain Competitive for Long-Context Tasks, Xiong et al. 2021, "
          "arXiv:2112.07210",
    summary="softmax(Q K^T / sqrt(dh)) V over a sliding window: causal keys t-w+1..t, bidirectional "
            "|t-r| < w; O(n w)",
    note="MHA/SparseOrLowRank/014.md", cost=local_attention_cost,
))
