"""mha(moba, block=B, topk=k): Mixture of Block Attention (MoBA; Lu et al. 2025, arXiv:2502.13189), the causal form
the paper trains.

The keys are cut into blocks of B positions. A parameter-free gate scores each block for each query (per query head)
by the query against the block's mean-pooled key, s_ic = q_i . mean(K_c); the query's own block is always chosen
(its score +inf) and future blocks never (-inf); the top k blocks are chosen, and the query attends over the union
of their keys with one softmax, causally masked (inside its own block, keys after it):

    o_i = sum_{j in U_i, j <= i} softmax_j(q_i . k_j / sqrt(dh)) v_j,   U_i = the keys of topk_c(s_ic) blocks

So a query reads its own block and the k - 1 best past blocks (every past block while there are fewer), as the
authors' reference (moba_naive: +inf on the current block, -inf after it, top-k, the causal mask over the union).
Choices where the paper is silent: with grouped K/V heads each query head selects on its own (against its K/V head's
mean keys); ties between equal gate scores are broken by torch.topk (measure zero on real data); the selection has
no gradient (a discrete choice; the authors' gate takes none either), so the gate runs without autograd; 16-bit
inputs are scored in float32 (as the authors' reference; the cost counts the input's dtype).

How it runs (one gathered form, eager and exported alike): the gate [b, h, n, M + k] over the M = ceil(n/B) blocks
and k padding blocks (-inf, so topk always has k candidates and no branch reads n), the k selected blocks' keys and
values gathered per query by position ([b, h, n, k B, dh]; blocks and mean keys are gathered by index, never cut by
a view of the symbolic length, which the export cannot split), and one F.scaled_dot_product_attention call with
each query as a batch of one row against its k B keys (bool mask: j <= i). O(n k B d) for the attention, O(n (n / B) d) for the
gate: quadratic with a 1 / B constant, declared as such. Memory, as declared: the gathered keys and values are
[b, h, n, k B, dh] each (as large as the attention's multiply-adds, where the paper's varlen kernel gathers queries
per block and holds O(n k d)), and the gate's [b, h, n, n / B + k] scores are held at once (quadratic with 1 / B). No position scheme inside (decoding with absolute ones
is tested); dropout= is refused. Padding: right padding only (a causal op never reads the padded keys; left
padding moves the blocks, refused with E409). Decoding keeps every key and value (kv_heads heads) and the mean keys
of the finished blocks; the new queries select among those.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from ...decode import slot
from ..registry import Op, OpEnv, ShapeProblem, register, require_right_padding
from ._common import AttentionBase, AttentionParams, attention_shape
from ._moba_cost import moba_cost


class MobaParams(AttentionParams):
    block: int = Field(64, ge=1, le=1 << 16, description="B: the keys' block length")
    topk: int = Field(3, ge=1, le=1024, description="k: blocks each query reads, its own included")


def moba_shape(p: MobaParams, env: OpEnv):
    if not env.causal:
        raise ShapeProblem("mha(moba) is causal only: the paper's gate chooses among past blocks and the query's own",
                           hint="use it in a causal model (causal=true), or mha(softmax) here")
    if p.dropout:
        raise ShapeProblem("mha(moba) runs the fused kernel, which never forms the weights to drop out", "dropout",
                           "remove dropout=, or put dropout(standard) on the stream")
    return attention_shape(p, env)


class MobaAttention(AttentionBase):
    def __init__(self, p: MobaParams, env: OpEnv):
        super().__init__(p, env)
        self.block, self.topk = p.block, p.topk

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        key_mask = self.key_mask(ctx)
        require_right_padding(key_mask, "mha(moba)", "its blocks are counted from each row's first position, and left "
                                                     "padding moves the tokens")
        q, k, v = self.qkv(x)
        return self.out(self.attend(q, k, v, 0))

    def means(self, k: torch.Tensor) -> torch.Tensor:
        """Mean keys [b, kv, C, dh] of the C blocks of k [b, kv, C B, dh] (the blocks gathered by index, not cut by
        a view: the export cannot prove that a symbolic length splits into C blocks of B)."""
        C = k.shape[2] // self.block
        idx = torch.arange(C, device=k.device)[:, None] * self.block + torch.arange(self.block, device=k.device)
        return k[:, :, idx].mean(3)

    def select(self, q: torch.Tensor, means: torch.Tensor, start) -> torch.Tensor:
        """The k chosen blocks [b, h, T, k] of queries start.. (q [b, h, T, dh]) among the blocks of `means`
        [b, kv, C, dh] (C >= k; those past the query's own are never chosen, only padding for topk)."""
        T, C = q.shape[2], means.shape[2]
        with torch.no_grad():
            if q.dtype in (torch.float16, torch.bfloat16):  # scored in float32, as the authors' gate (fewer ties)
                q, means = q.float(), means.float()
            if self.heads != self.kv_heads:  # each query head's K/V head (by index: repeat_interleave of a symbolic
                #                               length does not export)
                means = means.index_select(1, torch.arange(self.heads, device=q.device) // (self.heads // self.kv_heads))
            gate = q @ means.transpose(-1, -2)  # [b, h, T, C]
            own = (torch.arange(T, device=q.device) + start) // self.block
            c = torch.arange(C, device=q.device)
            gate.masked_fill_(c[None, :] > own[:, None], float("-inf"))  # in place: the scores are new
            gate.masked_fill_(c[None, :] == own[:, None], float("inf"))
            return gate.topk(self.topk, dim=-1).indices

    def gathered(self, q, k, v, sel, start):
        """Attention of q [b, h, T, dh] (positions start..) over the selected blocks `sel` [b, h, T, k] of k, v
        [b, kv, N, dh] (N a multiple of B): one row per query against its k B gathered keys, masked j <= i."""
        b, h, T, dh = q.shape
        B = self.block
        head = torch.arange(h, device=q.device) // (h // self.kv_heads)  # each query head's K/V head

        r = torch.arange(B, device=q.device)
        pos = (sel[..., None] * B + r).flatten(3)  # [b, h, T, k B]: the selected blocks' key positions
        bi, hi = torch.arange(b, device=q.device)[:, None, None, None], head[None, :, None, None]
        kg, vg = k[bi, hi, pos], v[bi, hi, pos]  # [b, h, T, k B, dh]
        keep = pos <= (torch.arange(T, device=q.device) + start)[:, None]  # j <= i
        del pos
        o = F.scaled_dot_product_attention(q.reshape(b * h, T, 1, dh), kg.reshape(b * h, T, -1, dh),
                                           vg.reshape(b * h, T, -1, dh), attn_mask=keep.reshape(b * h, T, 1, -1))
        return o.reshape(b, h, T, dh)

    def attend(self, q, k, v, start):
        """q [b, h, T, dh] at positions start.. against every key 0 .. N-1 (k, v [b, kv, N, dh], N = start + T)."""
        N = k.shape[2]
        M = (N + self.block - 1) // self.block
        pad = (M + self.topk) * self.block - N  # k padding blocks: topk always has k candidates
        k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
        sel = self.select(q, self.means(k), start)
        return self.gathered(q, k, v, sel, start)

    def _step(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """Decoding: the new queries against the cached keys and values and their own; the cache keeps them all and
        the mean keys of the finished blocks, which the gate reads (the unfinished block is the query's own)."""
        start = ctx.offset
        q, k, v = self.qkv(x, start)
        old = ctx.cache.caches.get(slot(ctx, self))
        if old is not None:
            k, v = torch.cat((old[0], k), 2), torch.cat((old[1], v), 2)
        N = k.shape[2]
        f = N // self.block  # finished blocks
        done = 0 if old is None else old[2].shape[2]
        means = self.means(k[:, :, done * self.block:f * self.block])
        means = means if old is None else torch.cat((old[2], means), 2)
        ctx.cache.caches[slot(ctx, self)] = (k, v, means)
        B, K = self.block, self.topk
        pad = (f + 1 + K) * B - N  # the unfinished block and k padding blocks after the finished ones
        mp = F.pad(means, (0, 0, 0, 1 + K))  # their gate scores are +inf (own) or -inf
        sel = self.select(q, mp, start)
        return self.out(self.gathered(q, F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad)), sel, start))


OP = register(Op(
    decode="every key and value (kv_heads heads) and the mean keys of the finished blocks",
    family="mha", variant="moba", params=MobaParams, module=MobaAttention,
    causal="yes", shape=moba_shape, supports=frozenset(),
    paper="MoBA: Mixture of Block Attention for Long-Context LLMs, Lu et al. 2025, arXiv:2502.13189",
    summary="each query reads the top-k blocks of B keys by q . mean(K_block), its own block always (causally "
            "masked), future ones never; one softmax over their union; causal only; O(n k B d + n^2 d / B)",
    note="", cost=moba_cost,
))
