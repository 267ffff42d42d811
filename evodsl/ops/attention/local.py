"""mha(local): sliding-window attention, each query attends only the keys within `window` positions of it.

With w = window and s_tr = q_t . k_r / sqrt(dh) (+ the ALiBi bias, if any), per head

    o_t = sum_{r in W(t)} softmax_{r in W(t)}(s_tr) v_r,
    causal:        W(t) = {r : t-w+1 <= r <= t}      (w keys, the query's own included)
    bidirectional: W(t) = {r : |t-r| < w}            (2w-1 keys)

clipped to 0 .. n-1. Xiong et al. 2021 find this plain local attention competitive with the sparse and
low-rank schemes on long-context tasks. Computed blockwise (see _banded.py): O(n * w) time and memory.
"""
from __future__ import annotations

from pydantic import Field

from ..cost import Cost, Symbols
from ..registry import Op, OpEnv, register
from ._banded import banded_attention, banded_attention_cost
from ._common import AttentionBase, AttentionParams, attention_shape


class LocalAttentionParams(AttentionParams):
    window: int = Field(128, ge=1, description="w: causal, keys t-w+1 .. t; bidirectional, keys |t-r| < w")


class LocalAttention(AttentionBase):
    def __init__(self, p: LocalAttentionParams, env: OpEnv):
        super().__init__(p, env)
        self.window = p.window

    def forward(self, x, ctx):
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
    w = s.sym("w", p.window)
    return banded_attention_cost(p, env, s, lo=w - 1, hi=0 if env.causal else w - 1, cache_keys=w)


OP = register(Op(
    decode="a cache of the last w keys and values (kv_heads heads)",
    family="mha", variant="local", params=LocalAttentionParams, module=LocalAttention,
    causal="yes", shape=attention_shape, supports=frozenset({"rope", "alibi"}),
    paper="Simple Local Attentions Remain Competitive for Long-Context Tasks, Xiong et al. 2021, "
          "arXiv:2112.07210",
    summary="softmax(Q K^T / sqrt(dh)) V over a sliding window: causal keys t-w+1..t, bidirectional "
            "|t-r| < w; O(n w)",
    note="MHA/SparseOrLowRank/014.md", cost=local_attention_cost,
))
