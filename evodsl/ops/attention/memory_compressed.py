"""mha(memory_compressed, k=K): memory-compressed attention, the "M" of T-DMCA (Liu et al. 2018, Generating
Wikipedia by Summarizing Long Sequences, section 4.2.2).

Keys and values are shortened along the sequence by a learned strided 1-D convolution, kernel = stride = K, one
for the keys and one for the values (over all K/V channels, C = kv_heads * dh), applied after their projections:
slot s summarises tokens sK .. sK+K-1,

    K~_s = W_k [k_{sK}; ..; k_{sK+K-1}] + b_k,    V~_s = W_v [v_{sK}; ..; v_{sK+K-1}] + b_v     (W in R^{C x KC})

then per head softmax attention of the n queries over the slots: O(n^2 d / K) time.

Bidirectional: every query reads all ceil(n / K) slots (the last one zero-padded when K does not divide n).
Causal: slot s is finished only once its last token is, so query t reads slot s iff sK+K-1 <= t, the slots
0 .. u-1 with u = floor((t+1)/K). Alone, queries 0 .. K-2 would read nothing, and no query its own token; here
a query also reads the raw k, v of the tokens of its own unfinished slot, uK .. t (none when t closes a slot), in
one softmax with the slots:

    o_t = sum_{s<u} a_ts V~_s + sum_{uK<=r<=t} a_tr v_r,   a = softmax over {q_t.K~_s, q_t.k_r} / sqrt(dh)

That is local attention over blocks of K tokens joined to the compressed memory, as T-DMCA joins its local-block
("L") layers to its memory-compressed ("M") ones, here inside one layer and with blocks no longer than the
compression (our choice; the paper's causal M layer is not spelled out). Every token is thus read exactly once,
raw or compressed. The causal form groups the queries by u (queries uK-1 .. uK+K-2): each group's K queries read
the m = floor(n/K) slots (masked s >= u) and their group's K raw tokens (masked after the query): [n, m + K]
scores, never n x n. Decoding keeps the finished slots and the raw K/V of the unfinished slot's tokens (< K).
The export (a symbolic n) runs _gathered: the same sums, from indexed gathers instead of reshapes and slices.
Padding: padded keys and values are zeroed before the convolution and slots of padding alone are masked, which
equals the unpadded sequence when the padding comes after the tokens; left padding moves the tokens to other
slots and is refused (E409). No position scheme inside (a slot has no single position); dropout= is refused (its
weights' dropout is not modelled by the cost).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...decode import slot
from ..registry import Op, OpEnv, register, require_right_padding
from ._common import AttentionBase, AttentionParams
from ._memory_compressed_cost import memory_compressed_cost
from .isab import no_dropout_shape


class MemoryCompressedParams(AttentionParams):
    k: int = Field(3, ge=1, le=1 << 16, description="K: compression, the kernel and stride of the K/V convolutions")


class MemoryCompressedAttention(AttentionBase):
    def __init__(self, p: MemoryCompressedParams, env: OpEnv):
        super().__init__(p, env)
        self.k = p.k
        C = self.kv_heads * self.head_dim
        # the strided convolutions, as a linear map of each slot's K tokens (input index j * C + c: token j, channel c)
        self.k_compress = nn.Linear(p.k * C, C, bias=p.bias)
        self.v_compress = nn.Linear(p.k * C, C, bias=p.bias)

    def compress(self, t: torch.Tensor, conv: nn.Linear) -> torch.Tensor:
        """t [b, n, C] (the projection's layout) -> the slots [b, kv, ceil(n/K), dh], the last zero-padded."""
        b, n, C = t.shape
        pad = (-n) % self.k
        if pad:
            t = F.pad(t, (0, 0, 0, pad))
        s = conv(t.reshape(b, (n + pad) // self.k, self.k * C))
        return s.view(b, s.shape[1], self.kv_heads, self.head_dim).transpose(1, 2)

    def forward(self, x, ctx):
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        kx, vx = self.k_proj(x), self.v_proj(x)
        key_mask = self.key_mask(ctx)
        require_right_padding(key_mask, "mha(memory_compressed)", "its slots are counted from each row's first "
                                                                  "position, and left padding moves the tokens")
        if not isinstance(n, int):  # export: one graph for every n
            return self.out(self._gathered(q, kx, vx, key_mask))
        if self.causal:
            return self.out(self._grouped(q, kx, vx))
        mask = None
        if key_mask is not None:  # bidirectional: padded K/V zeroed, slots of padding alone masked
            keep = key_mask[:, :, None].to(kx.dtype)
            kx, vx = kx * keep, vx * keep
            mask = key_mask[:, ::self.k][:, None, None, :]
        o = F.scaled_dot_product_attention(q, self.compress(kx, self.k_compress), self.compress(vx, self.v_compress),
                                           attn_mask=mask, enable_gqa=self.kv_heads != self.heads)
        return self.out(o)

    def _grouped(self, q, kx, vx):
        """The causal form: q [b, h, n, dh], kx, vx [b, n, C] -> o [b, h, n, dh]. Query t sits at row t + 1 of
        the queries padded to G = m + 1 groups of K (one row before position 0): group u reads slots 0 .. u-1 and
        the raw tokens uK .. uK+K-1 (padded past n), those after the query masked."""
        b, h, n, dh = q.shape
        K = self.k
        m = n // K
        r = n - m * K
        G = m + 1
        qg = F.pad(q, (0, 0, 1, K - 1 - r)).mul_(1.0 / math.sqrt(dh))  # [b, h, G K, dh]
        ks = self.expand_kv(self.compress(kx[:, :m * K], self.k_compress))  # [b, h, m, dh]
        vs = self.expand_kv(self.compress(vx[:, :m * K], self.v_compress))

        def raw(t):  # [b, h, G, K, dh]: group u's K tokens
            t = self.expand_kv(t.view(b, n, self.kv_heads, dh).transpose(1, 2))
            return F.pad(t, (0, 0, 0, K - r)).view(b, h, G, K, dh)

        kr, vr = raw(kx), raw(vx)
        s = torch.cat(((qg @ ks.transpose(-1, -2)).view(b, h, G, K, m),
                       qg.view(b, h, G, K, dh) @ kr.transpose(-1, -2)), dim=-1)  # [b, h, G, K, m + K]
        del qg, ks, kr
        w = s.masked_fill_(self._blocked(G, K, m, q.device), float("-inf")).softmax(-1)
        del s
        o = w[..., :m].reshape(b, h, G * K, m) @ vs
        o += (w[..., m:] @ vr).view(b, h, G * K, dh)
        return o[:, :, 1:n + 1]

    def _gathered(self, q, kx, vx, key_mask):
        """forward for a symbolic n (export): the slots' tokens and each group's rows gathered by index, not cut
        by reshapes, at least 2 slots and groups (unread ones masked or cut): no axis whose size is 1 or 0 at some
        n, where torch.export would specialize (past n, the gathers repeat token n - 1: never read, or zeroed in
        a slot). Bidirectional: SDPA over the ceil(n/K) slots; causal: _grouped's G = m + 1 groups over m slots."""
        b, h, n, dh = q.shape
        K, dev = self.k, q.device
        j = torch.arange(K, device=dev)
        head = torch.arange(h, device=dev) // (h // self.kv_heads)  # each query head's K/V head
        if key_mask is not None and not self.causal:
            keep = key_mask[:, :, None].to(kx.dtype)
            kx, vx = kx * keep, vx * keep
        M = (n + K - 1) // K if not self.causal else n // K  # not -(-n // K): ONNX Div truncates
        S = M + 2 if self.causal else torch.sym_max(M, 2)
        tok = torch.arange(S, device=dev)[:, None] * K + j  # [S, K]: slot s's tokens

        def slots(t, conv):  # [b, n, C] -> [b, h, S, dh]
            t = t[:, tok.clamp(max=n - 1)] * (tok < n)[..., None].to(t.dtype)
            return conv(t.flatten(2)).unflatten(2, (self.kv_heads, dh)).index_select(2, head).transpose(1, 2)

        ks, vs = slots(kx, self.k_compress), slots(vx, self.v_compress)
        if not self.causal:
            ok = (torch.arange(S, device=dev) < M)[None]  # [1 | b, S]: real slots, not padding alone
            if key_mask is not None:
                ok = ok & key_mask[:, tok[:, 0].clamp(max=n - 1)]
            return F.scaled_dot_product_attention(q, ks, vs, attn_mask=ok[:, None, None, :])
        G = M + 2 if self.causal else None
        row = torch.arange(G, device=dev)[:, None] * K + j  # [G, K]: group u's raw tokens; its queries one before
        qg = q[:, :, (row - 1).clamp(0, n - 1)] * (1.0 / math.sqrt(dh))  # [b, h, G, K, dh]
        kr, vr = (t[:, row.clamp(max=n - 1)].unflatten(3, (self.kv_heads, dh)).index_select(3, head).permute(0, 3, 1, 2, 4)
                  for t in (kx, vx))  # [b, h, G, K, dh]
        s = torch.cat((qg @ ks[:, :, None].transpose(-1, -2), qg @ kr.transpose(-1, -2)), dim=-1)
        w = s.masked_fill(self._blocked(G, K, S, dev), float("-inf")).softmax(-1)
        o = w[..., :S] @ vs[:, :, None] + w[..., S:] @ vr  # [b, h, G, K, dh]
        t = torch.arange(1, n + 1, device=dev)
        return o[:, :, t // K, t % K]

    @staticmethod
    def _blocked(G, K: int, S, device) -> torch.Tensor:
        """bool [G, K, S + K]: True where row i of group u may not look, slot s >= u or raw token j >= i (the
        padding row before position 0 reads raw token 0, any finite row: it is cut)."""
        u = torch.arange(G, device=device)[:, None, None]
        i = torch.arange(K, device=device)[None, :, None]
        c = torch.arange(S + K, device=device)[None, None, :]
        return ((c < S) & (c >= u)) | ((c - S >= i) & ((u > 0) | (i > 0) | (c > S)))  # no bool Where: onnxruntime

    def _step(self, x, ctx):
        """Decoding (causal). The cache: the finished slots (K~, V~: [b, kv, S, dh]) and the raw K/V of the
        unfinished slot's tokens ([b, R, C], R = offset mod K). A prefill runs the forward's grouped form; later
        tokens read the slots and raw tokens with a [T, S + R + T] mask."""
        start, K = ctx.offset, self.k
        b, T, _ = x.shape
        q = self.q_proj(x).view(b, T, self.heads, self.head_dim).transpose(1, 2)
        kx, vx = self.k_proj(x), self.v_proj(x)
        old = ctx.cache.caches.get(slot(ctx, self))
        if old is None:
            o = self._grouped(q, kx, vx)
            ks, vs = self.compress(kx[:, :T // K * K], self.k_compress), self.compress(vx[:, :T // K * K], self.v_compress)
            base = 0
        else:
            ks0, vs0, kr0, vr0 = old
            kx, vx = torch.cat((kr0, kx), dim=1), torch.cat((vr0, vx), dim=1)  # from the unfinished slot's start
            f = kx.shape[1] // K * K
            ks = torch.cat((ks0, self.compress(kx[:, :f], self.k_compress)), dim=2)
            vs = torch.cat((vs0, self.compress(vx[:, :f], self.v_compress)), dim=2)
            base = start - kr0.shape[1]
            S, R = ks.shape[2], kx.shape[1]
            t = torch.arange(start, start + T, device=x.device)[:, None]
            u = torch.div(t + 1, K, rounding_mode="floor")
            p = base + torch.arange(R, device=x.device)[None, :]
            keep = torch.cat((torch.arange(S, device=x.device)[None, :] < u, (p >= u * K) & (p <= t)), dim=1)

            def heads(a):
                return a.view(b, R, self.kv_heads, self.head_dim).transpose(1, 2)

            o = F.scaled_dot_product_attention(q, torch.cat((ks, heads(kx)), dim=2), torch.cat((vs, heads(vx)), dim=2),
                                               attn_mask=keep, enable_gqa=self.kv_heads != self.heads)
        f = (base + kx.shape[1]) // K * K - base  # the raw tokens before the unfinished slot
        ctx.cache.caches[slot(ctx, self)] = (ks, vs, kx[:, f:].clone(), vx[:, f:].clone())
        return self.out(o)


OP = register(Op(
    decode="the finished compressed slots and the raw K/V of the unfinished slot's tokens (kv_heads heads)",
    family="mha", variant="memory_compressed", params=MemoryCompressedParams, module=MemoryCompressedAttention,
    causal="yes", shape=no_dropout_shape("mha(memory_compressed)"), supports=frozenset(),
    paper="Generating Wikipedia by Summarizing Long Sequences (T-DMCA), Liu et al. 2018, arXiv:1801.10198",
    summary="softmax over K, V shortened k-fold by learned strided convolutions (kernel = stride = k); causal: "
            "the finished slots plus the raw tokens of the query's own slot; O(n^2 d / k)",
    note="", cost=memory_compressed_cost,
))
