"""longconv(hyena, max_len=L, order=2, filter_order=64): the Hyena operator (Poli et al. 2023, arXiv:2302.10866,
Def. 3.1 and Sec. 3.3), as a sublayer (the block's norm and residual are the model's), order N:

    x_1, .., x_N, v = split(conv_s(in_proj(u)))      (N + 1) d streams; conv_s depthwise, causal, s = 3 taps
    h_i(t) = FFN(z_t) . exp(-|delta_c| t / (L - 1))  the implicit filters [N, d] at t < n, z_t = [t / (L - 1),
                                                      cos(2 pi f_j t / L), -sin(2 pi f_j t / L)], f = linspace(1e-4,
                                                      B - 1, B), B = (emb - 1) / 2 bands; FFN = Linear, sin(w .),
                                                      Linear, sin, Linear, sin, Linear (one shared frequency w)
    z = v;  z <- x_i (h_i * z + beta_i z),  i = 1..N  each long convolution by FFT (_fftconv.py), O(d n log n)
    out = out_proj(z)

Choices where the paper is silent, as the authors' code (safari src/models/sequence/hyena.py): the FFN's width is
filter_order with two inner layers; the decay rates delta are fixed (a buffer), spread over the N d channels from
ln(0.01) / 1.5 to ln(0.01) / 0.3; the positional features are fixed (the code's learning rate for them is 1e-5; a
buffer here); beta (the filter's bias, a skip per channel) is N(0, 1). The paper's order N is kept (N long
convolutions and N gates: the authors' code with order=2 runs one); the streams are split as [x_1, .., x_N, v].
Causal only (the operator is; no bidirectional form given). The filter depends on t and L only, never on n, so
a sequence is at most L long (E410). Decoding: no finite state (the filters are length n): the short
convolution's last s - 1 inputs and, per long convolution, the history of its inputs [b, d, t] (declared: it grows
with t); a step recomputes the filters to t and each convolution at the new positions (the direct sum, O(t d)).
Padding: a padded position's input to the short convolution and to every long convolution is zeroed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...decode import slot
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register, sequence_shape
from ._conv_layer import check_length, keep_mask, zero_padding
from ._fftconv import causal_tail, fft_conv
from ._hyena_cost import hyena_cost


class HyenaParams(OpParams):
    max_len: int = Field(ge=2, le=1 << 20, description="L: the filters' time scale, the longest sequence")
    order: int = Field(2, ge=1, le=8, description="N: long convolutions and gates")
    filter_order: int = Field(64, ge=1, le=4096, description="the implicit filter FFN's width")
    emb: int = Field(3, ge=3, le=65, description="positional features of t (odd: t, then cos and sin bands)")
    short: int = Field(3, ge=1, le=64, description="s: taps of the short depthwise causal convolution")


def hyena_shape(p: HyenaParams, env: OpEnv):
    shape = sequence_shape(p, env)
    if not env.causal:
        raise ShapeProblem("longconv(hyena) is causal only: its operator is defined causal", None,
                           "use it in a causal model (head(lm)), or longconv(long) for a bidirectional one")
    if p.emb % 2 == 0:
        raise ShapeProblem(f"emb={p.emb} is even: t, then a cos and a sin for each band", "emb", "give an odd emb")
    return shape


class HyenaFilter(nn.Module):
    def __init__(self, channels: int, p: HyenaParams):
        super().__init__()
        self.L, self.bands = p.max_len, (p.emb - 1) // 2
        self.register_buffer("f", torch.linspace(1e-4, self.bands - 1, self.bands))
        ln = math.log(1e-2)
        self.register_buffer("delta", torch.linspace(ln / 1.5, ln / 0.3, channels).abs())
        fo = p.filter_order
        self.freq = nn.Parameter(torch.ones(fo))
        self.layers = nn.ModuleList([nn.Linear(p.emb, fo), nn.Linear(fo, fo), nn.Linear(fo, fo),
                                     nn.Linear(fo, channels, bias=False)])

    def forward(self, n) -> torch.Tensor:
        """h [channels, n]: the FFN of the features of t = 0..n-1, times the decay window."""
        t = torch.arange(n, device=self.f.device, dtype=self.f.dtype)[:, None]
        w = 2 * math.pi * t * self.f / self.L
        h = torch.cat((t / (self.L - 1), w.cos(), -w.sin()), -1)  # [n, emb]
        for layer in self.layers[:-1]:
            h = torch.sin(self.freq * layer(h))
        h = self.layers[-1](h) * torch.exp(-t / (self.L - 1) * self.delta)
        return h.transpose(0, 1)


class HyenaOperator(nn.Module):
    def __init__(self, p: HyenaParams, env: OpEnv):
        super().__init__()
        d, N = env.d, p.order
        self.d, self.N, self.s, self.max_len = d, N, p.short, p.max_len
        self.in_proj = nn.Linear(d, (N + 1) * d)
        self.short_conv = nn.Conv1d((N + 1) * d, (N + 1) * d, p.short, groups=(N + 1) * d)
        self.filter = HyenaFilter(N * d, p)
        self.beta = nn.Parameter(torch.randn(N, d))
        self.out_proj = nn.Linear(d, d)

    def forward(self, u: torch.Tensor, ctx=None) -> torch.Tensor:
        n, keep = u.shape[1], keep_mask(ctx, True)
        z = zero_padding(self.in_proj(u).transpose(1, 2), keep)  # [b, (N + 1) d, n]
        cache = None if ctx is None else ctx.cache
        key = None if cache is None else slot(ctx, self)
        state = None if cache is None else cache.caches.get(key)
        t = n if state is None else state[1].shape[-1] + n  # positions so far
        check_length("longconv(hyena)", t, self.max_len)
        zc = F.pad(z, (self.s - 1, 0)) if state is None else torch.cat((state[0], z), -1)
        del z
        kept = None if cache is None else [zc[..., zc.shape[-1] - (self.s - 1):].clone()]
        *xs, y = self.short_conv(zc).split(self.d, 1)
        del zc
        h = self.filter(t).reshape(self.N, self.d, t)
        for i, x in enumerate(xs):
            y = zero_padding(y, keep)
            if cache is None:
                conv = fft_conv(y, h[i])
            else:  # the history of this convolution's inputs, and the direct sum at the new positions
                full = y.clone() if state is None else torch.cat((state[1 + i], y), -1)
                kept.append(full)
                conv = causal_tail(full, h[i], n)
            y = x * (conv + self.beta[i, :, None] * y)
            del conv
        if cache is not None:
            cache.caches[key] = tuple(kept)
        return self.out_proj(y.transpose(1, 2))


OP = register(Op(
    decode="the short convolution's last s - 1 inputs and each long convolution's input history [d, t]: it grows "
           "with the length (the filters are length n: no finite state)",
    family="longconv", variant="hyena", params=HyenaParams, module=HyenaOperator, causal="yes", shape=hyena_shape,
    paper="Hyena Hierarchy: Towards Larger Convolutional Language Models, Poli et al. 2023, arXiv:2302.10866",
    summary="x_1..x_N, v = conv_s(in_proj(u)); h_i = FFN(pos(t)) exp(-delta t); z = v; z = x_i (h_i * z + beta_i z) "
            "by FFT; out_proj(z); O(N d n log n + n d^2)",
    cost=hyena_cost, note="LongConv/007.md",
))
