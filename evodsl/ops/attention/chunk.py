"""mha(chunk, c=C): ChunkFormer's chunked attention (Ju et al. 2021), softmax attention inside non-overlapping
chunks of C tokens.

Positions 0 .. n-1 fall into chunks [uC, (u+1)C) counted from position 0 (the last one holds the n mod C tokens
left over). With s_tr = q_t . k_r / sqrt(dh) (+ the ALiBi bias, if any), per head

    o_t = sum_{r in U(t)} softmax_{r in U(t)}(s_tr) v_r,
    bidirectional: U(t) = {r : floor(r / C) = floor(t / C)}          (the query's whole chunk)
    causal:        U(t) = {r : floor(r / C) = floor(t / C), r <= t}  (its chunk up to itself)

No token reads another chunk: O(n C d) time and memory. The full chunks run as one F.scaled_dot_product_attention
call over a [b * n/C, h, C, dh] view of q, k and v (causal: is_causal on each chunk), the n mod C tokens left as a
call of their own. Decoding keeps the K/V of the current chunk's tokens (at most C - 1). Padding: padded keys are
masked; chunks are counted from each row's first position, so left padding (which moves the tokens to other
chunks) is refused (E409).

before=B, after=A, wrap=true: HF Reformer's LocalSelfAttention (_adjacent.py): chunk u's queries also read chunks
u - B .. u + A (wrap: modulo the chunk count, the first chunk's previous being the last, as HF; causal: keys up
to the query only), masked keys at HF's -1e9; n padded to a multiple of C, the padded keys masked. No step form
and no in-attention positions for it. Cost: _adjacent_cost.py.
"""
from __future__ import annotations

import math
from dataclasses import replace

import sympy as sp
import torch
import torch.nn.functional as F
from pydantic import Field

from ...decode import slot
from ..cost import Cost, Symbols
from ..position._inattention import InAttentionPosition
from ..registry import Op, OpEnv, ShapeProblem, register, require_right_padding
from ._adjacent import local_adjacent
from ._adjacent_cost import local_cost
from ._banded import POSITION_BIAS, _prefix_mask
from ._common import (LSE_BYTES, AttentionBase, AttentionParams, attention_cost, attention_shape, head_symbols,
                      position_cost, rotates, score_bias)


class ChunkParams(AttentionParams):
    c: int = Field(64, ge=1, le=1 << 20, description="C: tokens per chunk, counted from position 0")
    before: int = Field(0, ge=0, le=8, description="chunks before its own that a chunk reads (HF Reformer's local)")
    after: int = Field(0, ge=0, le=8, description="chunks after its own that a chunk reads")
    wrap: bool = Field(False, description="neighbours wrap around: the first chunk's previous is the last (HF)")


class ChunkAttention(AttentionBase):
    def __init__(self, p: ChunkParams, env: OpEnv):
        super().__init__(p, env)
        self.c = p.c
        self.adjacent = (p.before, p.after, p.wrap) if (p.before, p.after, p.wrap) != (0, 0, False) else None

    def forward(self, x, ctx):
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        q, k, v = self.qkv(x)
        key_mask = self.key_mask(ctx)
        n = x.shape[1]
        require_right_padding(key_mask, "mha(chunk)", "its chunks are counted from each row's first position, and "
                                                      "left padding moves the tokens")
        if self.adjacent is not None:  # HF Reformer's LocalSelfAttention (_adjacent.py)
            return self.out(local_adjacent(q, self.expand_kv(k), self.expand_kv(v), key_mask, self.c,
                                           *self.adjacent, self.causal, self.dropout if self.training else 0.0))
        if not isinstance(n, int) or torch.jit.is_tracing():
            return self.out(self._gathered(q, k, v, key_mask))
        return self.o_proj(self._chunks(q, k, v, key_mask).flatten(2))

    def _chunks(self, q, k, v, key_mask=None):
        """[b, n, h, dh]: the full chunks in one call, the tokens left over in another, joined (one copy) if both."""
        b, h, n, dh = q.shape
        c = min(self.c, n)
        m, r = divmod(n, c)
        mask = self._mask(c, q)
        parts = []
        if m:
            parts.append(self._attend(*(t[:, :, :m * c] for t in (q, k, v)), m, c, mask,
                                      None if key_mask is None else key_mask[:, :m * c]))
        if r:
            parts.append(self._attend(*(t[:, :, m * c:] for t in (q, k, v)), 1, r,
                                      None if mask is None else mask[..., :r, :r],
                                      None if key_mask is None else key_mask[:, m * c:]))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _mask(self, c: int, q):
        """The position scheme's bias on one chunk, [1, h, c, c] (-inf after each query when causal), or None."""
        if self.pos is None or type(self.pos).bias is InAttentionPosition.bias:  # none, or rope's turn only
            return None
        return _prefix_mask(c, self.position_bias, self.causal, q.dtype, q.device)

    def _attend(self, q, k, v, m: int, c: int, mask, key_mask):
        """q [b, h, m*c, dh], k, v [b, kv, m*c, dh] -> [b, m*c, h, dh], chunk u of c tokens reading itself only:
        one SDPA call over [b*m, h, c, dh] (views of the projections' [b, n, h, dh] outputs for one sequence or
        whole chunks; else copies)."""
        b, h, _, dh = q.shape

        def chunked(t):
            return t.transpose(1, 2).reshape(b * m, c, t.shape[1], dh).transpose(1, 2)

        if key_mask is not None:  # right padding: the padded keys out; a query with no key left reads its own
            keep = key_mask.reshape(b * m, 1, 1, c)
            own = torch.eye(c, dtype=torch.bool, device=q.device)
            ok = keep if mask is None else keep & torch.isfinite(mask)
            if self.causal and mask is None:
                ok = ok & own.cumsum(0).bool()
            ok = ok | (own & ~ok.any(-1, keepdim=True))
            mask = ok if mask is None else torch.where(ok, mask, float("-inf"))
        o = F.scaled_dot_product_attention(chunked(q), chunked(k), chunked(v), attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=self.causal and mask is None and c > 1,
                                           enable_gqa=self.kv_heads != self.heads)
        return o.transpose(1, 2).reshape(b, m * c, h, dh)

    def _gathered(self, q, k, v, key_mask):
        """For a symbolic n (export): each query gathers the C key slots of its chunk, [b, h, n, C, dh], the slots
        past n (or after the query, causal) masked: O(n C), with shapes that only scale n."""
        n, dh, c = q.shape[2], q.shape[3], self.c
        i = torch.arange(n, device=q.device).unsqueeze(1)
        j = torch.div(i, c, rounding_mode="floor") * c + torch.arange(c, device=q.device)  # [n, C]
        ok = (j < n) & (j <= i) if self.causal else j < n
        jc = j.clamp(max=n - 1)
        kg, vg = self.expand_kv(k)[:, :, jc], self.expand_kv(v)[:, :, jc]
        s = (q.unsqueeze(-2) @ kg.transpose(-1, -2)).squeeze(-2) * (1.0 / math.sqrt(dh))
        bias = self.position_bias(i, j)
        if bias is not None:
            s = s + bias.to(s.dtype)
        if key_mask is not None:
            ok = ok & key_mask[:, jc].unsqueeze(1)
            ok = ok | ((j == i) & ~ok.any(-1, keepdim=True))
        w = F.dropout(s.masked_fill(~ok, float("-inf")).softmax(-1), self.dropout if self.training else 0.0)
        return (w.unsqueeze(-2) @ vg).squeeze(-2)

    def _step(self, x, ctx):
        """Decoding (causal): the new queries up to the next chunk boundary read the cached K/V of their chunk
        and their own; those after it run as chunks; the cache then keeps the K/V of the last, unfinished chunk."""
        start, c = ctx.offset, self.c
        q, k, v = self.qkv(x, start)
        old = ctx.cache.caches.get(slot(ctx, self))
        t = q.shape[2]
        head = min(t, -start % c)  # the new queries in the chunk the cache has begun
        parts = []
        if head:
            kh, vh = torch.cat((old[0], k[:, :, :head]), dim=2), torch.cat((old[1], v[:, :, :head]), dim=2)
            i = torch.arange(start, start + head, device=x.device)[:, None]
            j = torch.arange(start + head - kh.shape[2], start + head, device=x.device)[None, :]
            mask = torch.zeros(i.shape[0], j.shape[1], dtype=q.dtype, device=x.device)
            mask = mask.masked_fill_(j > i, float("-inf"))
            bias = self.position_bias(i, j)
            if bias is not None:
                mask = mask + bias.to(q.dtype)
            o = F.scaled_dot_product_attention(q[:, :, :head], kh, vh, attn_mask=mask,
                                               enable_gqa=self.kv_heads != self.heads)
            parts.append(o.transpose(1, 2))
        if head < t:
            parts.append(self._chunks(q[:, :, head:], k[:, :, head:], v[:, :, head:]))
            kh, vh = k[:, :, head:], v[:, :, head:]
        keep = (start + t) % c  # the tokens of the unfinished chunk; a copy, as a view keeps what it was cut from
        ctx.cache.caches[slot(ctx, self)] = (kh[:, :, kh.shape[2] - keep:].clone(),
                                             vh[:, :, vh.shape[2] - keep:].clone())
        o = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.o_proj(o.flatten(2))


def chunk_cost(p: ChunkParams, env: OpEnv, s: Symbols) -> Cost:
    """SDPA over the m = floor(n / C) full chunks ([b*m, h, C, C] scores), then over the r = n - m C tokens left
    ([b, h, r, r]); C is min(c, n), so m >= 1. Layouts decide the copies: q, k, v come as views of the
    projections' [b, n, h, dh] outputs, or contiguous [b, h, n, dh] (rotated); the chunked view [b*m, h, C, dh]
    of the full chunks is free for one sequence, or for a sequence of whole chunks laid out [b, n, h, dh], else
    a copy. Both calls' outputs are joined into one result (a copy) that o_proj reads."""
    if (p.before, p.after, p.wrap) != (0, 0, False):
        return local_cost(p, env, s)
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    c = sp.Min(s.sym("c", p.c), n)
    m = sp.floor(n / c)
    r = n - m * c
    M = m * c
    scores = b * h * (m * c ** 2 + r ** 2)
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    qm, km, qt = b * M * h * dh * by, b * M * kv * dh * by, b * r * h * dh * by
    qkv, lse = q + 2 * kvb, LSE_BYTES * b * h * n
    tl, many = sp.Min(1, r), sp.Min(1, b - 1)  # a tail call; several sequences
    rot = rotates(env)
    cp_qk = many if rot else many * tl  # the full chunks' q (and k) copied into the chunked layout
    cp_v = many * tl
    copies = cp_qk * (qm + km) + cp_v * km
    kept_qk = 1 - cp_qk * (1 - tl)  # the storages of q and k kept (read in place, or by the tail)
    bias = score_bias(env)
    pos = Cost() if bias else position_cost(env, s, h, kv, dh)
    mask = h * c ** 2 * by if bias else 0
    other = 5 * scores + ((2 + h) * c ** 2 + 8 * c ** 2 if bias else 0)
    core = Cost(fwd=4 * scores * dh, bwd=10 * scores * dh, fwd_other=other, bwd_other=2 * other)
    saved = (kept_qk * (q + kvb) + kvb + copies + qm + tl * (qt + q) + lse + mask + pos.saved)  # o: laid out like the chunked q
    if p.dropout > 0:  # training runs SDPA's math kernel (float32): it keeps q and k scaled, v, the weights, their
        # dropout mask and the dropped weights, and lays its output out [b*m, h, C, dh] (a copy for o_proj)
        f32 = max(by, 4)
        core = replace(core, bwd=8 * scores * dh)
        saved = (3 * b * n * h * dh + 3 * scores) * f32 + q + pos.saved
    phases = [qkv + mask + copies + qm + LSE_BYTES * b * h * M,  # the full chunks' call
              qkv + mask + qm + tl * (qt + LSE_BYTES * b * h * r),  # the tail's call
              qkv + mask + qm + tl * (qt + q),  # the join
              qkv + q + out]  # at o_proj
    if bias:
        phases.append(qkv + POSITION_BIAS.peak(h, c ** 2, by) - (0 if env.causal else mask))
    if env.pos is not None:
        phases.append(qkv + pos.peak)
    # backward: one call, o's gradient and those of q, k, v; with a tail, the gradients of the tail's q, k, v
    # laid into full-size ones, then the full chunks' (several sequences: their copies', the storages released,
    # o's gradient copied into the chunked layout and released)
    single = 2 * q + 2 * kvb
    tail = (1 - many) * (q + 2 * kvb + qm + 2 * km) + many * (2 * qm + 2 * km - q) - qt - LSE_BYTES * b * h * r
    if p.dropout > 0:  # the math kernel: v's gradient and the weights' beside o's; with a tail, beside the tail's
        # gradients laid into full-size ones (its own saved tensors released) and o's gradient in the chunked layout
        w_m = b * h * m * c ** 2 * f32
        single = q + w_m
        tail = 2 * q - 6 * qt + 2 * qm + w_m
    bwd = [single * (1 - tl) + tail * tl]
    return attention_cost(p, s, h, kv, dh, core, pos, saved, phases,
                          cache=2 * b * sp.Mod(n, s.sym("c", p.c)) * kv * dh * by, bwd_phases=bwd)


def _shape(p: ChunkParams, env: OpEnv):
    if (p.before, p.after, p.wrap) != (0, 0, False) and env.pos is not None:
        raise ShapeProblem(f"mha(chunk) with neighbouring chunks (HF Reformer's local attention) cannot apply "
                           f"pos({env.pos[0].variant})", "before", "add positions to the stream, e.g. pos(axial)")
    return attention_shape(p, env)


def _decode(p: ChunkParams):
    if (p.before, p.after, p.wrap) != (0, 0, False):  # HF's layout: the chunks follow the padded length
        return None
    return "the K/V of the current chunk's tokens: at most c - 1 positions (kv_heads heads)"


OP = register(Op(
    decode=_decode,
    family="mha", variant="chunk", params=ChunkParams, module=ChunkAttention,
    causal="yes", shape=_shape, supports=frozenset({"rope", "xpos", "alibi"}),
    paper="ChunkFormer: Learning Long Time Series with Multi-stage Chunked Transformer, Ju et al. 2021, "
          "arXiv:2112.15087",
    summary="softmax(Q K^T / sqrt(dh)) V inside non-overlapping chunks of c tokens (causal: up to the query); "
            "O(n c d)",
    note="MHA/SparseOrLowRank/006.md", cost=chunk_cost,
))
