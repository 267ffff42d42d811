"""What DeltaNet and Gated DeltaNet share (deltanet.py, gated_deltanet.py): the layer around the delta rule's kernel
as fla's DeltaNet / GatedDeltaNet layers wire it. Short causal depthwise convolutions (kernel K, no bias, then SiLU)
on the projected q, k and v; q and k L2-normalised per head, q scaled by 1/sqrt(dk); the write strength beta_t =
sigmoid(x_t W_beta) per head; after the kernel an RMSNorm per head (a learned scale shared by the heads), gated by
swish(x W_g) where the variant has an output gate, then W_O.

Decoding keeps, beside the state, each convolution's last K - 1 inputs. Padding: a padded position's projected
q, k, v are zeroed before the convolutions (the zeros the convolution pads with), so left padding leaves each
sequence alone; its key and beta are zeroed as every chunked recurrence's (_linear_recurrent.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...decode import slot
from ..registry import OpEnv
from ._common import AttentionParams
from ._linear_recurrent import HeadNorm, RecurrentAttention


class DeltaParams(AttentionParams):
    conv: int = Field(4, ge=0, le=64, description="kernel of the short convolutions on q, k, v (0: none)")
    chunk: int = Field(64, ge=1, le=4096, description="tokens a chunk of the chunked form")


class ShortConv(nn.Module):
    """A causal depthwise convolution over [b, n, c] and SiLU, y_t = silu(sum_j w_j * x_(t-K+1+j)), as K shifted
    products (torch's conv1d would do the same multiply-adds; this form exports as it runs and its FLOPs are plain
    elementwise ones); `tail` (the last K - 1 inputs before, or None: zeros) continues a sequence. Returns (output,
    the last K - 1 inputs)."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(kernel, channels) / kernel ** 0.5)
        self.kernel = kernel

    def forward(self, x: torch.Tensor, tail=None):
        k, n = self.kernel, x.shape[1]
        xx = F.pad(x, (0, 0, k - 1, 0)) if tail is None else torch.cat((tail, x), 1)  # [b, K - 1 + n, c]
        y = xx[:, :n] * self.weight[0]
        for j in range(1, k):
            y = y + xx[:, j:j + n] * self.weight[j]
        return F.silu(y), xx[:, xx.shape[1] - (k - 1):]


class DeltaLayer(RecurrentAttention):
    delta = True
    gated_output = False  # swish(x W_g) on the normed heads
    decays = False  # a log decay per head and token (Gated DeltaNet's), from `log_decay(x)`

    def __init__(self, p: DeltaParams, env: OpEnv):
        super().__init__(p, env)
        h, kv, dh = self.heads, self.kv_heads, self.head_dim
        self.b_proj = nn.Linear(env.d, h, bias=p.bias)
        self.convs = nn.ModuleList([ShortConv(c, p.conv) for c in (h * dh, kv * dh, kv * dh)]) if p.conv else None
        self.o_norm = HeadNorm(dh, rms=True)
        self.g_proj = nn.Linear(env.d, h * dh, bias=p.bias) if self.gated_output else None

    def features(self, x, ctx, offset):
        b, n, _ = x.shape
        h, kv, dh = self.heads, self.kv_heads, self.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.convs is not None:
            mask = self.key_mask(ctx)
            if mask is not None:  # padded positions: the zeros the convolution pads with
                keep = mask[..., None].to(x.dtype)
                q, k, v = q * keep, k * keep, v * keep
            cache = ctx.cache if ctx is not None else None
            outs = []
            for conv, t in zip(self.convs, (q, k, v)):
                tail = None if cache is None else cache.caches.get(slot(ctx, conv), (None,))[0]
                y, tail = conv(t, tail)
                if cache is not None:
                    cache.caches[slot(ctx, conv)] = (tail.clone(),)
                outs.append(y)
            q, k, v = outs
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q = F.normalize(q.view(b, n, h, dh), dim=-1).transpose(1, 2) * dh ** -0.5
        k = self.expand_kv(F.normalize(k.view(b, n, kv, dh), dim=-1).transpose(1, 2))
        v = self.expand_kv(v.view(b, n, kv, dh).transpose(1, 2))
        beta = torch.sigmoid(self.b_proj(x)).transpose(1, 2)  # [b, h, n]
        # laid out by head (a copy each): the kernel's matmuls would each copy a head-strided view
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return q, k, v, self.log_decay(x) if self.decays else None, beta

    def finish(self, x, o):
        b, h, n, dv = o.shape
        o = self.o_norm(o).transpose(1, 2).reshape(b, n, h * dv)
        return self.o_proj(o if self.g_proj is None else F.silu(self.g_proj(x)) * o)
