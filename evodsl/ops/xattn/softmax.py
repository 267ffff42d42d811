"""xattn(softmax, kv=NAME): cross-attention, softmax(Q K^T * scale) V per head, with the queries from the stream
it sits in ([b, m, d]) and the keys and values from the named stream ([b, n, d_kv]), as in the decoder of
Vaswani et al. 2017 (encoder-decoder attention), Perceiver's latents reading the input, and Perceiver AR.

Lowers to F.scaled_dot_product_attention. heads/kv_heads/head_dim/bias/dropout/scale as mha(softmax). Keys are
masked where the named stream is padded. No position scheme applies: the positions of two sequences are not
comparable (T5 gives its cross-attention no bias either). When the named stream is causal (time-ordered), the
queries are its last m positions' (Perceiver AR; m <= n, checked) and each reads only its past: query i reads
keys j <= i + n - m (the causal mask aligned at the end; with m = n, the ordinary causal mask).
"""
from __future__ import annotations

from dataclasses import replace

import sympy as sp
import torch
import torch.nn.functional as F
from pydantic import Field

from ..attention._common import LSE_BYTES, AttentionBase, AttentionParams, attention_shape, head_symbols
from ..cost import Cost, Symbols, length, linear
from ..registry import Op, OpEnv, ShapeProblem, register
from ...decode import slot


class CrossAttentionParams(AttentionParams):
    kv: str = Field(description="the stream keys and values are read from (a stream of the model)")
    scale: float | None = Field(None, gt=0, description="score scale; default 1/sqrt(head_dim) (T5: 1.0)")


def _shape(p: CrossAttentionParams, env: OpEnv):
    if len(env.in_shapes) < 2:
        raise ShapeProblem(f"xattn(softmax) reads stream '{p.kv}', which is not wired in", "kv",
                           "cross-attention needs a model with streams: model NAME { src = ... tgt = ... }")
    kv = env.in_shapes[1]
    if len(kv) != 3 or not isinstance(kv[-1], int):
        raise ShapeProblem(f"xattn reads keys and values from stream '{p.kv}' of shape "
                           f"[{', '.join(map(str, kv))}]; it needs [b, n, d]", "kv",
                           "embed a token stream before reading it: src = input(tokens) -> embed(token) -> ...")
    if len(env.in_causal) > 1 and env.in_causal[1]:
        fewer = length(kv[1]) - length(env.shape[1])  # keys - queries
        if fewer.is_number and fewer < 0:
            raise ShapeProblem(f"xattn(softmax) reads causal stream '{p.kv}' of {kv[1]} positions with "
                               f"{env.shape[1]} queries", "kv",
                               "in a causal stream the queries are the last positions of the stream read: at most "
                               "as many as it has (slice(last=k) first)")
    return attention_shape(p, env)


def kv_causal(env: OpEnv) -> bool:
    return len(env.in_causal) > 1 and bool(env.in_causal[1])


class CrossAttention(AttentionBase):
    def __init__(self, p: CrossAttentionParams, env: OpEnv):
        super().__init__(p, replace(env, pos=None), d_kv=env.in_shapes[1][-1])
        self.kv_stream, self.scale = p.kv, p.scale
        self.causal = kv_causal(env)  # the named stream is time-ordered: read only its past

    def forward(self, x: torch.Tensor, ctx, kv: torch.Tensor) -> torch.Tensor:
        b, m, _ = x.shape
        n = kv.shape[1]
        q = self.q_proj(x).view(b, m, self.heads, self.head_dim).transpose(1, 2)
        cached = ctx.cache.caches.get(slot(ctx, self)) if ctx is not None and ctx.cache is not None else None
        if cached is not None:  # decoding: the source's K/V, computed at the prompt
            k, v = cached
        else:
            k = self.k_proj(kv).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(kv).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
            if ctx is not None and ctx.cache is not None:
                ctx.cache.caches[slot(ctx, self)] = (k, v)
        if self.causal and isinstance(m, int) and isinstance(n, int) and m > n:
            from ...diagnostics import Diagnostic, EvoError

            raise EvoError([Diagnostic("E410", f"xattn(softmax, kv={self.kv_stream}) has {m} queries but {n} keys "
                                               f"in a causal stream",
                                       help="its queries are the last positions of the stream it reads: at most "
                                            "as many as that stream has")])
        keep = self._allowed(ctx, m, n, x.device)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=self.causal and keep is None, scale=self.scale,
                                           enable_gqa=self.kv_heads != self.heads)
        return self.out(o)

    def _allowed(self, ctx, m: int, n: int, device):
        """The keys each query may read, or None when SDPA's own flags say it (nothing padded, and not causal or
        m = n): with padding, bool [b, 1, m, n] (not padded; causal: j <= i + n - m); causal alone, an additive
        [m, n] mask of the dtype (what SDPA would make of a bool one). A query left with no key (every key of a
        source padded; a padded position whose past is all padding) reads every key: finite, and read by no
        one (a real causal query reads at least its own position, as m <= n)."""
        mask, right = ctx.streams.get(self.kv_stream, (None, False)) if ctx is not None else (None, False)
        if mask is not None and self.causal and right:
            mask = None  # every padded key follows every token: a causal read never reaches one
        same = isinstance(m, int) and isinstance(n, int) and m == n  # symbolic (exporting): never assumed
        if mask is None:
            if not self.causal or same:
                return None
            i, j = torch.arange(m, device=device), torch.arange(n, device=device)
            dtype = self.q_proj.weight.dtype
            return torch.zeros(m, n, dtype=dtype, device=device).masked_fill_(j[None, :] > i[:, None] + (n - m),
                                                                              float("-inf"))
        keep = mask[:, None, None, :]
        if self.causal:
            i, j = torch.arange(m, device=device), torch.arange(n, device=device)
            keep = keep & (j[None, :] <= i[:, None] + (n - m))
        return keep | ~keep.any(-1, keepdim=True)


def cost(p: CrossAttentionParams, env: OpEnv, s: Symbols) -> Cost:
    """SDPA on [b, h, m, n] scores, m the queries (this stream, s.n), n the keys (the named stream). The causal
    mask of unequal lengths is a bool [m, n] tensor; SDPA turns it into an additive mask of the dtype and keeps that
    for backward."""
    h, kv, dh = head_symbols(p, s)
    b, m, by = s.b, s.n, s.bytes
    n = s.length(env.in_shapes[1][1])
    d_kv = s.sym("d_kv", env.in_shapes[1][-1]) if env.in_shapes[1][-1] != env.d else s.d
    scores = b * h * m * n
    q, kvb, out = b * m * h * dh * by, b * n * kv * dh * by, b * m * s.d * by
    mask = m * n * by if kv_causal(env) and env.in_shapes[1][1] != env.shape[1] else 0  # additive, [m, n]
    proj = (linear(s, s.d, h * dh, p.bias) + linear(s, d_kv, kv * dh, p.bias, tokens=b * n).scaled(2)
            + linear(s, h * dh, s.d, p.bias))
    core = Cost(fwd=4 * scores * dh, bwd=10 * scores * dh, fwd_other=5 * scores, bwd_other=10 * scores)
    kv_in = b * n * d_kv * by  # the gradient of the named stream (from k_proj, from v_proj, their sum)
    saved = q + 2 * kvb + q + LSE_BYTES * b * h * m + mask  # q, k, v, the output, its logsumexp, the mask
    peak = q + 2 * kvb + q + mask  # at o_proj: q, k, v, SDPA's output, the mask (the output not counted)
    projections = [q + 3 * kv_in - saved, q + out + kv_in - saved]  # the stream's three, then the queries'
    bwd = [2 * q + 2 * kvb, *projections]  # the kernel: o's gradient and those of q, k, v
    if p.dropout > 0:  # in training the math kernel: float32 weights, its dropout mask and the dropped weights
        core = replace(core, bwd=8 * scores * dh)
        saved = (b * m * h * dh + 2 * b * n * h * dh + 3 * scores) * max(by, 4) + q + mask
        bwd = [b * n * h * dh * by + scores * max(by, 4), *projections]  # v's gradient (h heads), the weights'
        projections = [q + 3 * kv_in - saved, q + out + kv_in - saved]
        bwd = [bwd[0], *projections]
    return replace(proj + core, saved=saved, peak=peak, cache=2 * b * n * kv * dh * by, saves_input=True,
                   saves_output=False, bwd_peak=sp.Max(*bwd))


OP = register(Op(
    decode="the named stream's K/V, computed once at the prompt (an encoder's output)",
    family="xattn", variant="softmax", params=CrossAttentionParams, module=CrossAttention, causal="yes",
    shape=_shape, streams=("kv",),
    paper="Attention Is All You Need, Vaswani et al. 2017, arXiv:1706.03762 (encoder-decoder attention)",
    summary="softmax(Q(x) K(s)^T / sqrt(dh)) V(s) per head, s the stream named by kv; causal s: its past only",
    cost=cost,
))
