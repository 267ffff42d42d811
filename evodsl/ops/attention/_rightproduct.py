"""What the right-product attentions without a denominator share (mha(fanet), mha(simpletron)): per head

    bidirectional:  o_i = c(n) q'_i^T sum_j k'_j v_j^T = c(n) q'_i^T G,            G in R^{dh x dh}
    causal:         o_i = c(i + 1) q'_i^T sum_{j <= i} k'_j v_j^T

with q', k' the op's features of q and k (l2-normalised for FANet, q and k themselves for SimpleTRON) and c a
scale of the number of keys a query reads (1/n for FANet's mean, 1/sqrt(n) for SimpleTRON). Padding: padded
keys add nothing to the sums (k' zeroed) and the number of keys is that of the real tokens a query reads (each
sequence's own n; causal, the tokens up to i), so a padded batch equals each sequence alone.

The causal form runs in chunks of C tokens as mha(linear) does: within a chunk the masked C x C products
q' k'^T (j <= i); across chunks the [dh x dh] states of all earlier chunks (an exclusive cumulative sum). O(n C dh
+ (n / C) dh^2) time and memory, no n x n tensor and no per-position [dh x dh] state. Decoding keeps G = sum_j
k'_j v_j^T per K/V head; the number of keys is the position itself. K/V heads (GQA) each keep one G.
"""
from __future__ import annotations

import sympy as sp
import torch
import torch.nn.functional as F

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ...decode import slot
from ._common import AttentionBase, AttentionParams, attention_cost, head_symbols


class RightProductAttention(AttentionBase):
    """Subclasses define `features(q, k)` (q', k') and `scale(count)` (c, elementwise on a float tensor)."""

    chunk = 64  # C, tokens per chunk of the causal form

    def features(self, q: torch.Tensor, k: torch.Tensor):
        return q, k

    def scale(self, count: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        q, k, v = self.qkv(x)
        q, k = self.features(q, k)
        key_mask = self.key_mask(ctx)
        if key_mask is not None:  # padded keys add nothing to the sums
            k = k * key_mask[:, None, :, None].to(k.dtype)
        if not self.causal:
            # the number of keys each sequence has: its real tokens (x.shape[1] unpadded)
            n = x.shape[1] if key_mask is None else key_mask.sum(-1).to(q.dtype)[:, None, None, None]
            g = (k.transpose(-1, -2) @ v) * self.scale(n)  # [b, kv, dh, dh]
            return self.out(q @ self.expand_kv(g))
        n = x.shape[1]
        # the keys query i reads: i + 1, or the real tokens up to i (at least 1: a padded query before every token
        # reads no key and gets 0, finite)
        count = (torch.arange(1, n + 1, device=x.device, dtype=q.dtype) if key_mask is None
                 else key_mask.cumsum(-1).clamp(min=1).to(q.dtype)[:, None, :])
        k, v = self.expand_kv(k), self.expand_kv(v)
        if not isinstance(n, int) or torch.jit.is_tracing():
            return self.out(self._prefix_sums(q, k, v).mul_(self.scale(count)[..., None]))
        return self.out(self._chunked(q, k, v, self.scale(count)[..., None]))

    def _chunked(self, q, k, v, scale):
        """c(i + 1) q'_i^T sum_{j <= i} k'_j v_j^T in chunks of C tokens (see the module's docstring)."""
        b, h, n, dh = q.shape
        c = min(self.chunk, n)
        pad = -n % c  # padded tokens come last, so causally they reach only padded outputs, which are dropped
        m = (n + pad) // c

        def chunked(t):  # one copy, padded, in the [b, h, n, dh] layout the chunked matmuls read as views
            return (F.pad(t, (0, 0, 0, pad)) if pad else t.contiguous()).view(b, h, m, c, t.shape[-1])

        q, k, v = chunked(q), chunked(k), chunked(v)
        future = torch.ones(c, c, dtype=torch.bool, device=q.device).triu(1)
        a = (q @ k.transpose(-1, -2)).masked_fill_(future, 0.0)  # q'_i^T k'_j, j <= i, within each chunk
        # the states of all earlier chunks: an exclusive cumulative sum over chunks
        s = F.pad((k.transpose(-1, -2) @ v).cumsum(2)[:, :, :-1], (0, 0, 0, 0, 1, 0))  # [b, h, m, dh, dh]
        return (q @ s).add_(a @ v).view(b, h, m * c, -1)[:, :, :n].mul_(scale)

    @staticmethod
    def _prefix_sums(q, k, v):
        """The causal sums for a symbolic n (torch.export, ONNX with a dynamic sequence axis): the running state
        sum_{j <= i} k'_j v_j^T as a cumulative sum over positions; O(n dh^2) memory, never n x n."""
        s = (k.unsqueeze(-1) * v.unsqueeze(-2)).cumsum(2)  # [b, h, n, dh, dh]
        return (q.unsqueeze(-2) @ s).squeeze(-2)

    def _step(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """Decoding: the new tokens read G = sum_j k'_j v_j^T of every earlier token, plus each other causally,
        scaled by their positions; then G takes theirs in. G is [dh x dh] per K/V head."""
        q, k, v = self.qkv(x, ctx.offset)
        q, k = self.features(q, k)
        b, kvh, n, dh = k.shape
        g = ctx.cache.caches.get(slot(ctx, self), k.new_zeros(b, kvh, dh, v.shape[-1]))
        a = (q @ self.expand_kv(k).transpose(-1, -2)).masked_fill_(
            torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1), 0.0)
        o = q @ self.expand_kv(g) + a @ self.expand_kv(v)
        count = torch.arange(ctx.offset + 1, ctx.offset + n + 1, device=x.device, dtype=q.dtype)
        ctx.cache.caches[slot(ctx, self)] = g + k.transpose(-1, -2) @ v
        return self.out(o * self.scale(count)[:, None])


def right_product_cost(p: AttentionParams, env: OpEnv, s: Symbols, normalized: bool) -> Cost:
    """Bidirectional: K'^T V per K/V head and Q' G per query head, 2 n dh^2 each. Causal, over N = m C tokens (n
    padded to C-token chunks): per chunk the C x C products Q' K'^T and A V, the state K'^T V and Q' S.
    `normalized`: q and k go through F.normalize (FANet), which keeps its input and two [b, heads, n] norms."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    norms = 2 * b * n * (h + kv) * by if normalized else 0  # each F.normalize keeps ||x|| and its clamp
    feats = q + kvb if normalized else 0  # the inputs F.normalize keeps (the projections' outputs)
    if env.causal:
        c = sp.Min(RightProductAttention.chunk, n)
        N = sp.ceiling(n / c) * c
        t = b * h * N * dh * by  # one [b, h, N, dh] chunked tensor
        a, mask = b * h * N * c * by, c ** 2  # the C x C blocks, and the bool mask of the future
        states = b * h * N / c * dh ** 2 * by  # the state before every chunk
        padded = sp.Min(1, N - n)
        # q, k, v at h heads (grouped K/V heads repeated: contiguous, so k and v are copied only to be padded)
        chunks = t + (2 * t if kv == h else 2 * t * padded)
        fwd = 4 * b * h * N * c * dh + 4 * b * h * N * dh ** 2
        other = b * h * N * c + b * h * N / c * dh ** 2 + 2 * b * h * N * dh
        # kept: the chunked q', k', v; A; the mask; the states; the scale per position; o_proj's copy
        saved = feats + norms + 3 * t + a + mask + states + n * by + q
        phases = [3 * q + chunks + a + mask + states + 2 * t + 2 * n * by,  # at A V: q', k', v, their chunks, ...
                  3 * q + t + q + out]  # at o_proj
        # backward: the gradients of o (in the chunked layout), of q's chunks and of A; o_proj's copy and the
        # scale released
        bwd = [a + 2 * t - q - n * by]
    else:
        g, g_kv = b * h * dh * dh * by, b * kv * dh * dh * by  # G for every query head (repeated), per K/V head
        fwd = 2 * b * kv * n * dh ** 2 + 2 * b * h * n * dh ** 2
        other = b * kv * dh ** 2
        saved = feats + norms + q + 2 * kvb + g + q  # q', k', v, G, o_proj's copy
        phases = [3 * q + 2 * kvb + g_kv + out]  # at o_proj: q', k', v, G, the output and its copy
        if normalized:
            phases.append(2 * q + 3 * kvb)  # q, k, v, q' and k' while k is normalised
            # backward (measured): F.normalize's, three [b, h, n, dh] gradients at once, G's released; with
            # grouped K/V heads one of k's size and k's two norms fewer
            bwd = [3 * q - g if kv == h else 3 * q - kvb - 2 * b * kv * n * by - g]
        else:  # the gradients of q and of G, o_proj's copy released
            bwd = [q + g]
    if normalized:
        other += 3 * b * n * (h + kv) * dh
    core = Cost(fwd=fwd, bwd=2 * fwd, fwd_other=other, bwd_other=2 * other)
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=b * kv * dh ** 2 * by,
                          bwd_phases=bwd)
