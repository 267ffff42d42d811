"""mha(multiscale, window=w, pool=k, scales=S): the "retina" attention of Multi-scale Transformer Language Models
(Subramanian, Collobert, Ranzato & Boureau 2020, section 3): a token reads nearby tokens at full resolution and
farther ones at coarser, pooled resolutions. Only the abstract and introduction were reachable from here; this is
our reading of the retina model (README, under the op table), close to BP-Transformer (mha(bpt)) as the seed notes.

Scale s pools aligned blocks of P_s = k^s tokens (slot c: tokens c P_s .. c P_s + P_s - 1), keys and values
mean-pooled over the block's real tokens. Query t (at full resolution) reads every earlier position exactly once,
walking outward: scale 0 the tokens b_1 .. t, scale s = 1 .. S - 1 the blocks of P_s between b_{s+1} and b_s, and
scale S every block of P_S before b_S, with b_s = max(0, P_s floor((b_{s-1} - w P_{s-1}) / P_s)) (b_0 = t + 1): at
least w slots a scale (up to w + k - 1, as each boundary is aligned down to the next scale's grid), the last scale
unbounded. Bidirectional: the same outward walk after t (e_0 = t + 1, e_s = P_s ceil((e_{s-1} + w P_{s-1}) / P_s),
blocks past n holding only their real tokens). One softmax over all the slots:

    o_t = sum_slots softmax_slot(q_t . k~_slot / sqrt(dh)) v~_slot

Causal by construction (a slot before t holds no token after t). O(n (2S(w + k)) d + n^2 d / k^S): the near
slots are gathered (from prefix sums of k and v), the last scale is dense over the n / k^S blocks, masked: its
n^2 / k^S term leads for long n, as the catalog's O(n^2 d) says. Choices where the text is silent (all ours): the
aligned grids, mean pooling, the window of w slots per scale, the last scale covering the rest, one softmax.
Decoding keeps every key and value (the last scale reads all blocks); the export runs the same form, its softmax
taken in two parts (near slots, last scale) under one maximum. Right padding
only (blocks are aligned at each row's start: E409 for left padding); no position scheme inside; no dropout.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from ...decode import append_kv
from ..registry import Op, OpEnv, register, require_right_padding
from ._common import AttentionBase, AttentionParams
from ._multiscale_cost import multiscale_cost
from .isab import no_dropout_shape


class MultiscaleParams(AttentionParams):
    window: int = Field(8, ge=1, le=4096, description="w: slots read at each scale before the last, each side")
    pool: int = Field(2, ge=2, le=64, description="k: scale s pools blocks of k^s tokens")
    scales: int = Field(2, ge=1, le=16, description="S: the coarsest scale, which reads all the blocks left")


def floor_div(a, b):
    return torch.div(a, b, rounding_mode="floor")


def slots(p: MultiscaleParams, t: torch.Tensor, causal: bool):
    """For queries at positions t [T]: the near slots' token ranges [first, last) [T, W] with a validity mask, and
    the last scale's bounds (its blocks c < lo, and c >= hi when bidirectional) [T]."""
    w, k, S = p.window, p.pool, p.scales
    span = w + k - 1  # at most this many slots a scale and side
    j = torch.arange(span, device=t.device)
    first, valid = [], []
    b = t + 1  # the walk before t: scale s covers [b_{s+1}, b_s)
    e = t + 1  # after t: [e_s, e_{s+1})
    for s in range(S):
        P, Q = k ** s, k ** (s + 1)
        nb = (floor_div(b - w * P, Q) * Q).clamp(min=0)
        c = floor_div(b, P)[:, None] - 1 - j  # blocks of P, outward from b
        first.append(c * P)
        valid.append(first[-1] >= nb[:, None])
        b = nb
        if not causal:
            ne = -floor_div(-(e + w * P), Q) * Q  # ceil
            c = floor_div(e, P)[:, None] + j
            first.append(c * P)
            valid.append(first[-1] + P <= ne[:, None])
            e = ne
    first = torch.cat(first, 1)
    size = torch.cat([torch.full((1, span * (1 if causal else 2)), k ** s, device=t.device) for s in range(S)], 1)
    P = k ** S
    return first, first + size, torch.cat(valid, 1), floor_div(b, P), floor_div(e, P)


class MultiscaleAttention(AttentionBase):
    def __init__(self, p: MultiscaleParams, env: OpEnv):
        super().__init__(p, env)
        self.p = p

    def forward(self, x, ctx):
        key_mask = self.key_mask(ctx)
        require_right_padding(key_mask, "mha(multiscale)", "its blocks are counted from each row's first position, "
                                                           "and left padding moves the tokens")
        start = 0
        q, k, v = self.qkv(x)
        if ctx is not None and ctx.cache is not None:  # decoding: every key and value kept
            start = ctx.offset
            k, v = append_kv(ctx, self, k, v)
        return self.o_proj(self.attend(q, k, v, key_mask, start))

    def attend(self, q, k, v, key_mask=None, start=0):
        """q [b, h, T, dh] at positions start.., k, v [b, kv, n, dh] at 0 .. n - 1 -> o [b, T, h dh] (o_proj's
        layout). The g = h / kv query heads of a K/V head are grouped against its slots (no repeated keys)."""
        b, h, T, dh = q.shape
        n, dev, p, kv = k.shape[2], q.device, self.p, self.kv_heads
        g = h // kv
        cnt = torch.ones_like(k[:1, 0, :, 0]) if key_mask is None else key_mask.to(q.dtype)  # [B, n]
        if key_mask is not None:
            k, v = k * cnt[:, None, :, None], v * cnt[:, None, :, None]
        sums = [F.pad(t.cumsum(2), (0, 0, 1, 0)) for t in (k, v)]  # [b, kv, n + 1, dh]: sums before each position
        Pc = F.pad(cnt.cumsum(-1), (1, 0))  # [B, n + 1]
        t = torch.arange(start, start + T, device=dev)
        first, last, valid, lo, hi = slots(p, t, self.causal)

        def pooled(first, last):  # the mean keys and values of tokens [first, last) (clamped), their counts
            first, last = first.clamp_(0, n), last.clamp_(0, n)
            c = Pc[:, last] - Pc[:, first]
            per = c.clamp(min=1)[:, None, ..., None]
            Pk, Pv = sums
            return (Pk[:, :, last] - Pk[:, :, first]) / per, (Pv[:, :, last] - Pv[:, :, first]) / per, c

        kn, vn, cn = pooled(first, last)  # [b, kv, T, W, dh], [B, T, W]
        P = p.pool ** p.scales
        N = (n + P - 1) // P  # the last scale's blocks; exported, at least 2 (the extra one empty, masked): no axis
        c = torch.arange(N if isinstance(n, int) else torch.sym_max(N, 2), device=dev)  # of length 1 at some n
        kt, vt, ct = pooled(c * P, c * P + P)  # [b, kv, N, dh], [B, N]
        sums.clear()  # the prefix sums released
        qg = (q * (1.0 / math.sqrt(dh))).view(b, kv, g, T, dh).transpose(2, 3).contiguous()  # [b, kv, T, g, dh]
        W, N = kn.shape[3], kt.shape[2]
        near = qg @ kn.transpose(-1, -2)  # [b, kv, T, g, W]
        # a slot of padding alone is no key; the query's own token stays (a padded query: a zero key, finite)
        own = torch.arange(W, device=dev) == 0
        near = near.masked_fill_((~valid | ((cn <= 0) & ~own))[:, None, :, None, :], float("-inf"))
        tail = (qg.view(b, kv, T * g, dh) @ kt.transpose(-1, -2)).view(b, kv, T, g, N)
        far = (c[None, :] < lo[:, None]) | ((c[None, :] >= hi[:, None]) if not self.causal else False)
        tail = tail.masked_fill_(~(far & (ct[:, None, :] > 0))[:, None, :, None, :], float("-inf"))
        if isinstance(T, int):  # one softmax over the concatenated slots
            s = torch.cat((near, tail), dim=-1)
            del near, tail
            w = s.softmax(-1)  # [b, kv, T, g, W + N]
            del s
            o = w[..., :W] @ vn + (w[..., W:].reshape(b, kv, T * g, N) @ vt).view(b, kv, T, g, dh)
        else:  # export: the same softmax in two parts (torch.export cannot prove the slice's reshape a view)
            mx = torch.maximum(near.amax(-1, keepdim=True), tail.amax(-1, keepdim=True))
            en, et = (near - mx).exp(), (tail - mx).exp()
            o = en @ vn + (et.view(b, kv, T * g, N) @ vt).view(b, kv, T, g, dh)
            o = o / (en.sum(-1, keepdim=True) + et.sum(-1, keepdim=True))
        return o.permute(0, 2, 1, 3, 4).reshape(b, T, h * dh)


OP = register(Op(
    decode="every key and value (the coarsest scale reads all blocks before the query's window)",
    family="mha", variant="multiscale", params=MultiscaleParams, module=MultiscaleAttention,
    causal="yes", shape=no_dropout_shape("mha(multiscale)"), supports=frozenset(),
    paper="Multi-scale Transformer Language Models (the retina model), Subramanian, Collobert, Ranzato & Boureau "
          "2020, arXiv:2005.00581",
    summary="retina attention (our reading): each token reads, walking outward, w slots at each scale s < S (the "
            "tokens, then mean-pooled aligned blocks of k^s) and every block of k^S beyond; one softmax; "
            "O(n S (w + k) d + n^2 d / k^S)",
    note="", cost=multiscale_cost,
))
