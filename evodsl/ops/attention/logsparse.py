"""mha(logsparse, window=w, conv=k): LogSparse attention with convolutional self-attention (Li et al. 2019,
"Enhancing the Locality and Breaking the Memory Bottleneck of Transformer on Time Series Forecasting", sec. 3.2-3.3).

Each cell t attends itself, its window of the w - 1 cells before it, and cells at exponentially growing distances
beyond the window; with s_tr = q_t . k_r / sqrt(dh), per head

    o_t = sum_{r in A(t)} softmax_{r in A(t)}(s_tr) v_r,
    A(t) = {t - j : 0 <= j < w} u {t - (w - 1) - 2^i : i = 0, 1, ...}      (r >= 0)

w = 1 is the paper's LogSparse set {t, t - 1, t - 2, t - 4, ..., t - 2^floor(log2 t)}; w > 1 its local variant (a
dense window, then log-spaced cells). Bidirectional: the mirrored set t + j as well. conv = k > 1 builds q and
k by a causal convolution of kernel k over the inputs x_{t-k+1} .. x_t (its convolutional self-attention; the
values stay a 1 x 1 projection); padded inputs are zeroed before it, so that a padded sequence is the sequence alone.

Every query gathers its W = w + ceil(log2 n) (bidirectional 2W - 1) keys: [b, h, n, W, dh], O(n log n dh) time
and memory, never n x n (the export gathers LOG_MAX log-spaced keys, a fixed W). Decoding keeps every key and
value (the farthest reaches back half the sequence) and the last k - 1 inputs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...decode import slot
from ..registry import Op, OpEnv, register
from ._common import AttentionBase, AttentionParams, attention_shape
from ._logsparse_cost import logsparse_cost

LOG_MAX = 24  # log-spaced keys of the export's fixed gather (sequences up to 2^24 positions)


class LogSparseParams(AttentionParams):
    window: int = Field(1, ge=1, le=1 << 16, description="w: the dense window (the query and w - 1 cells before)")
    conv: int = Field(1, ge=1, le=64, description="k: kernel of the causal convolution building q and k (1: linear)")


def offsets(n: int, w: int, causal: bool, logs: int | None = None) -> list[int]:
    """The distances t - r of A(t) that fit in n positions (`logs` log-spaced ones instead, for export)."""
    far, i = [], 0
    while (logs is None and w - 1 + (1 << i) <= n - 1) or (logs is not None and i < logs):
        far.append(w - 1 + (1 << i))
        i += 1
    back = list(range(w)) + far
    return back if causal else back + [-j for j in back[1:]]


def allows(w: int, causal: bool, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Whether query t reads key r (int64, broadcasting)."""
    d = t - r if causal else (t - r).abs()
    far = d - (w - 1)
    ok = ((d >= 0) & (d < w)) | ((far > 0) & ((far & (far - 1)) == 0))
    return ok & (r <= t) if causal else ok


class LogSparseAttention(AttentionBase):
    def __init__(self, p: LogSparseParams, env: OpEnv):
        super().__init__(p, env)
        self.window, self.conv = p.window, p.conv
        if p.conv > 1:  # q and k from a causal convolution over the last k inputs
            self.q_proj = nn.Conv1d(env.d, self.heads * self.head_dim, p.conv, bias=p.bias)
            self.k_proj = nn.Conv1d(env.d, self.kv_heads * self.head_dim, p.conv, bias=p.bias)

    def qkv(self, x: torch.Tensor, offset: int = 0, before: torch.Tensor | None = None):
        """q [b, h, n, dh], k, v [b, kv, n, dh]; `before`: the k - 1 inputs before x (decoding), else zeros."""
        if self.conv == 1:
            return super().qkv(x, offset)
        b, n, _ = x.shape
        xt = x.transpose(1, 2)
        xt = F.pad(xt, (self.conv - 1, 0)) if before is None else torch.cat((before.transpose(1, 2), xt), -1)
        q = self.q_proj(xt).view(b, self.heads, self.head_dim, n).transpose(2, 3)
        k = self.k_proj(xt).view(b, self.kv_heads, self.head_dim, n).transpose(2, 3)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, x, ctx):
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        key_mask = self.key_mask(ctx)
        if key_mask is not None and self.conv > 1:  # padded inputs read as the conv's zero padding
            x = x * key_mask[..., None].to(x.dtype)
        q, k, v = self.qkv(x)
        n = x.shape[1]
        symbolic = not isinstance(n, int) or torch.jit.is_tracing()
        offs = offsets(LOG_MAX if symbolic else n, self.window, self.causal, LOG_MAX if symbolic else None)
        return self.out(log_sparse(q, self.expand_kv(k), self.expand_kv(v), offs, key_mask,
                                   self.dropout if self.training else 0.0))

    def _step(self, x, ctx):
        """Decoding (causal): the new queries against every cached key and their own, masked to A(t); the cache
        keeps every key and value and the last k - 1 inputs (for the convolution)."""
        start, cache = ctx.offset, ctx.cache.caches.get(slot(ctx, self))
        before = None
        if self.conv > 1:
            before = x.new_zeros(x.shape[0], self.conv - 1, x.shape[2]) if cache is None else cache[2]
        q, k, v = self.qkv(x, start, before)
        if cache is not None:
            k, v = torch.cat((cache[0], k), dim=2), torch.cat((cache[1], v), dim=2)
        i = torch.arange(start, start + q.shape[2], device=x.device)[:, None]
        mask = allows(self.window, True, i, torch.arange(k.shape[2], device=x.device)[None, :])
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.kv_heads != self.heads)
        kept = (k, v) if self.conv == 1 else (k, v, torch.cat((before, x), 1)[:, -(self.conv - 1):].clone())
        ctx.cache.caches[slot(ctx, self)] = kept
        return self.out(o)


def log_sparse(q, k, v, offs: list[int], key_mask=None, dropout: float = 0.0):
    """q, k, v [b, h, n, dh] -> [b, h, n, dh]: query t reads keys t - o, o in `offs` (within 0 .. n-1), one
    softmax. key_mask: bool [b, n], False = a padded key; the own key (offset 0) is always kept."""
    n, dh = q.shape[2], q.shape[3]
    t = torch.arange(n, device=q.device).unsqueeze(1)
    r = t - torch.tensor(offs, device=q.device)  # [n, W]
    ok = (r >= 0) & (r < n)
    rc = r.clamp(0, n - 1)
    if key_mask is not None:  # [b, 1, n, W]; offset 0 (column 0) is the query's own key
        ok = ok & key_mask[:, rc].unsqueeze(1)
        ok[..., 0] = True
    s = (q.unsqueeze(-2) @ k[:, :, rc].transpose(-1, -2)).squeeze(-2) * (1.0 / math.sqrt(dh))  # [b, h, n, W]
    w = F.dropout(s.masked_fill_(~ok, float("-inf")).softmax(-1), dropout)
    del s  # the softmax keeps its output only
    return (w.unsqueeze(-2) @ v[:, :, rc]).squeeze(-2)


OP = register(Op(
    decode=lambda p: "a cache of every key and value (kv_heads heads)" + (
        f" and the last {p.conv - 1} inputs" if p.conv > 1 else ""),
    family="mha", variant="logsparse", params=LogSparseParams, module=LogSparseAttention,
    causal="yes", shape=attention_shape,
    paper="Enhancing the Locality and Breaking the Memory Bottleneck of Transformer on Time Series Forecasting, "
          "Li et al. 2019, arXiv:1907.00235",
    summary="softmax attention over the cells t - j (j < w) and t - (w - 1) - 2^i (causal; mirrored when "
            "bidirectional), q and k by a causal conv of kernel k; O(n (w + log n) d)",
    note="MHA/SparseOrLowRank/007.md", cost=logsparse_cost,
))
