"""mha(topk, k=K, chunk=C): explicit top-k sparse attention (Explicit Sparse Transformer, Zhao et al. 2019,
arXiv:1912.11637), computed in query chunks as memory-efficient top-k attention does (Gupta et al. 2021,
arXiv:2106.06899).

Per head, each query keeps the k largest of its scores and gives every other key -inf before the softmax:

    s_ij = q_i . k_j / sqrt(dh),   o_i = sum_{j in T_i} softmax_{j in T_i}(s_ij) v_j,   T_i = top-k_j(s_ij)

(1912.11637 eq. 6-7: the scores below the k-th largest masked to -inf). Causal: T_i is the top k of the keys
j <= i; a query with fewer than k past keys keeps them all (the k-th largest does not exist). With k >= n this is
softmax attention.

How it runs: the selection runs without autograd (a discrete choice, as the papers' masks), in chunks of C queries
(2106.06899's query chunking): a chunk's [C, n] scores (causal: against the keys up to its last query, the later
chunks' keys never scored), masked (causal, padding) and top-k'd; so the selection holds O(C n) scores, never n x n.
Then each query's k selected keys and values are gathered ([b, h, n, k, dh]) and one F.scaled_dot_product_attention
call runs each query as a batch of one row against its k keys (bool mask: the selected slots that exist). Time
O(n^2 d) for the selection scores (quadratic, as both papers say: 1912.11637's is n^2 d, 2106.06899 saves memory,
not time) and O(n k d) for the attention; memory O(C n + n k d), linear in n at fixed C and k. The gradient flows
through the selected scores only (the same as the dense masked form's, whose masked scores have none).

Choices where the papers are silent: ties at the k-th score are broken by torch.topk (the selected set is then one
of the tied sets; measure zero on real data); with grouped K/V heads each query head selects on its own against its
K/V head's keys; a padded key is never selected (scored -inf), and a query with no key at all (a padded position
under left padding) reads its own; when a row has fewer than k keys, its scores are padded with -inf columns (the
export always pads, so that top-k never needs more candidates than exist, with no branch on n) and those slots are
masked. rope turns q and k before the selection; no score bias (ALiBi) inside; dropout= is refused (SDPA runs each
row's k weights fused). Decoding keeps K and V of every position (kv_heads heads); each new query takes its top k
over the cache and itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from ...decode import append_kv
from ..registry import Op, OpEnv, is_symbolic, register
from ._common import AttentionBase, AttentionParams
from ._topk_cost import topk_cost
from .isab import no_dropout_shape


class TopkParams(AttentionParams):
    k: int = Field(32, ge=1, le=1 << 16, description="k: the keys each query keeps (its k largest scores)")
    chunk: int = Field(64, ge=1, le=1 << 16, description="C: queries scored at once in the selection "
                                                         "(its memory is O(C n))")


class TopkAttention(AttentionBase):
    def __init__(self, p: TopkParams, env: OpEnv):
        super().__init__(p, env)
        self.k, self.chunk = p.k, p.chunk

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        if ctx is not None and ctx.cache is not None:  # decoding: the new queries against every cached key
            q, k, v = self.qkv(x, ctx.offset)
            k, v = append_kv(ctx, self, k, v)
            return self.out(self.attend(q, k, v, ctx.offset, None))
        q, k, v = self.qkv(x)
        return self.out(self.attend(q, k, v, 0, self.key_mask(ctx)))

    def select(self, q, k, start, key_mask):
        """The selection of queries start.. (q [b, h, T, dh]) among the keys 0 .. N-1 (k [b, kv, N, dh]):
        (idx [b, h, T, k] int64, 0 where the slot is empty; keep [b, h, T, k] bool, the slot holds a key)."""
        b, h, T, dh = q.shape
        kv, N = k.shape[1], k.shape[2]
        g = h // kv
        with torch.no_grad():
            if not isinstance(T, int) or is_symbolic(q):  # export: one chunk of every query, no loop over n
                head = torch.arange(h, device=q.device) // g  # each query head's K/V head (by index: repeat_interleave
                #                                                of a symbolic length does not export)
                sc = q @ (k if g == 1 else k.index_select(1, head)).transpose(-1, -2)  # [b, h, T, N]
                if self.causal:
                    i = torch.arange(T, device=q.device)[:, None] + start
                    sc = sc.masked_fill(torch.arange(N, device=q.device)[None, :] > i, float("-inf"))
                return self._pick(sc, key_mask, start, True)
            # eager: chunks of C queries, each chunk's scores in one workspace allocated once (so that the bytes
            # allocated in total grow as those held), the queries' heads folded into rows [b kv, g C, dh]
            kc = k.contiguous().view(b * kv, N, dh)
            C0 = min(self.chunk, T)
            ws = q.new_empty(b * h * C0 * N)
            tri = torch.ones(C0, C0, dtype=torch.bool, device=q.device).triu_(1) if self.causal else None
            idx = keep = None
            for s in range(0, T, self.chunk):
                e = min(s + self.chunk, T)
                C, K = e - s, min(N, start + e) if self.causal else N  # causal: the keys up to its last query
                sc = ws[:b * h * C * K].view(b * kv, g * C, K)
                torch.bmm(q[:, :, s:e].reshape(b * kv, g * C, dh), kc[:, :K].transpose(1, 2), out=sc)
                sc = sc.view(b, h, C, K)
                if self.causal:  # the chunk's last C keys are its own positions: j > i masked
                    sc[..., K - C:].masked_fill_(tri[:C, :C], float("-inf"))
                ind, ok = self._pick(sc, key_mask, start + s, K < self.k)
                if T <= self.chunk:
                    return ind, ok
                if idx is None:
                    idx, keep = ind.new_empty(b, h, T, self.k), ok.new_empty(b, h, T, self.k)
                idx[:, :, s:e], keep[:, :, s:e] = ind, ok
                del ind, ok
            return idx, keep

    def _pick(self, sc, key_mask, first, pad: bool):
        """The top k of the scores sc [b, h, C, K] of queries first.. (causal mask applied): padded keys -inf,
        -inf columns where K < k (pad), top-k; a query with no key at all reads its own."""
        C, K = sc.shape[2], sc.shape[3]
        if key_mask is not None:
            sc.masked_fill_(~key_mask[:, None, None, :K], float("-inf"))
        if pad:  # -inf columns: top-k always has k candidates
            sc = F.pad(sc, (0, self.k if not isinstance(K, int) else max(self.k - K, 0)), value=float("-inf"))
        val, ind = sc.topk(self.k, dim=-1)
        del sc
        ok = val > float("-inf")
        del val
        ind.masked_fill_(~ok, 0)
        if key_mask is not None:  # no key at all (a padded position under left padding): its own
            none = ~ok[..., :1].any(-1, keepdim=True)
            own = torch.arange(C, device=ind.device)[:, None] + first
            ind[..., :1] = torch.where(none, own, ind[..., :1])
            ok[..., :1] |= none
        return ind, ok

    def attend(self, q, k, v, start, key_mask):
        """q [b, h, T, dh] at positions start.. against the keys k, v [b, kv, N, dh]: o [b, h, T, dh]."""
        b, h, T, dh = q.shape
        idx, keep = self.select(q, k, start, key_mask)
        head = torch.arange(h, device=q.device) // (h // self.kv_heads)  # each query head's K/V head
        bi, hi = torch.arange(b, device=q.device)[:, None, None, None], head[None, :, None, None]
        kg, vg = k[bi, hi, idx], v[bi, hi, idx]  # [b, h, T, k, dh]
        del idx
        o = F.scaled_dot_product_attention(q.reshape(b * h, T, 1, dh), kg.reshape(b * h, T, self.k, dh),
                                           vg.reshape(b * h, T, self.k, dh), attn_mask=keep.reshape(b * h, T, 1, self.k))
        return o.reshape(b, h, T, dh)


OP = register(Op(
    decode="a K/V cache of every position so far (kv_heads heads); each new query takes its top k over it",
    family="mha", variant="topk", params=TopkParams, module=TopkAttention,
    causal="yes", shape=no_dropout_shape("mha(topk)"), supports=frozenset({"rope", "xpos"}),
    paper="Explicit Sparse Transformer: Concentrated Attention Through Explicit Selection, Zhao et al. 2019, "
          "arXiv:1912.11637; Memory-efficient Transformers via Top-k Attention, Gupta et al. 2021, arXiv:2106.06899",
    summary="each query keeps its k largest scores q . k_j / sqrt(dh) (-inf elsewhere), one softmax over them; the "
            "selection in query chunks of C (O(C n) scores), the k keys gathered: O(n^2 d) time, O(n (C + k d)) memory",
    note="MHA/SparseOrLowRank/001.md", cost=topk_cost,
))
