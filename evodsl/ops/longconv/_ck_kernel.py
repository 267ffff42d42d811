"""The continuous kernel of ckconv, flexconv (kernel=siren; its default, MAGNet, is _magnet.py) and ccnn: a SIREN MLP
(Sitzmann et al. 2020, as CKConv's kernel network) from a normalised relative position p to one kernel value per
channel,

    h_1 = sin(omega_0 (W_1 p + b_1)),  h_{l+1} = sin(omega_0 (W_{l+1} h_l + b_{l+1})),  k(p) = W_L h_{L-1} + b_L

(L = layers linear maps, the last one without a sine), optionally times FlexConv's Gaussian mask
exp(-(p - mu)^2 / (2 sigma^2)). Lags are normalised by max_len: causal p = 1 - 2 lag / (max_len - 1) (the newest
token at +1, the token max_len - 1 back at -1, CKConv's layout); bidirectional p = lag / (max_len - 1) (lag 0 at
0). Past max_len the MLP is evaluated outside [-1, 1]: it extrapolates (a continuous kernel has a value there).
Init as SIREN: W_1 uniform in +-1, the hidden maps in +-sqrt(6 / H) / omega_0, the last map in
+-sqrt(6 / H) / sqrt(max_len) (the output of a sum of max_len taps keeps the input's scale), biases as nn.Linear.
The conv is depthwise (one kernel per channel) followed by a pointwise mix W_o y + b_o (the paper's separable
form, as CCNN's SepFlexConv): O(b n d log n + b n d^2) where a kernel per channel pair would be O(b n d^2 log n);
the depthwise conv has no bias of its own (W_o c + b_o folds it into b_o).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...decode import slot
from ._ck_fft import fft_conv, lags


class SirenKernel(nn.Module):
    def __init__(self, d: int, hidden: int, layers: int, omega_0: float, max_len: int, causal: bool,
                 mask: float | None = None):
        super().__init__()
        self.omega_0, self.max_len, self.causal = omega_0, max_len, causal
        widths = [1] + [hidden] * (layers - 1) + [d]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        with torch.no_grad():
            self.linears[0].weight.uniform_(-1.0, 1.0)
            for lin in self.linears[1:-1]:
                lin.weight.uniform_(-math.sqrt(6 / hidden) / omega_0, math.sqrt(6 / hidden) / omega_0)
            self.linears[-1].weight.uniform_(-math.sqrt(6 / hidden / max_len), math.sqrt(6 / hidden / max_len))
        if mask is not None:  # FlexConv's Gaussian mask: its centre (the newest token, or lag 0) and width
            self.mu = nn.Parameter(torch.tensor(1.0 if causal else 0.0))
            self.sigma = nn.Parameter(torch.tensor(float(mask)))
        else:
            self.mu = self.sigma = None

    def position(self, lag: torch.Tensor) -> torch.Tensor:
        scale = 1.0 / (self.max_len - 1)
        return 1.0 - 2.0 * scale * lag if self.causal else scale * lag

    def forward(self, lag: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Kernel values [T, d] at lags [T] (float), zero where keep [T] (bool) is False."""
        p = self.position(lag)[:, None]
        h = p
        for lin in self.linears[:-1]:
            h = torch.sin(self.omega_0 * lin(h))
        k = self.linears[-1](h)
        if self.mu is not None:
            k = k * torch.exp(-0.5 * ((p - self.mu) / self.sigma).square())
        return k * keep[:, None].to(k.dtype)


class ContinuousConv(nn.Module):
    """y = W_o (k * x) + b_o: the depthwise FFT convolution with a SirenKernel (or `kernel`, a module of the same
    call: lags, keep -> [T, d], such as _magnet.MagnetKernel), then the pointwise mix. Padded positions are zeroed
    before the convolution (they enter no output); decoding keeps every input so far."""

    def __init__(self, d: int, hidden: int, layers: int, omega_0: float, max_len: int, causal: bool,
                 mask: float | None = None, bias: bool = True, kernel: nn.Module | None = None):
        super().__init__()
        self.causal = causal
        self.kernel = kernel if kernel is not None else SirenKernel(d, hidden, layers, omega_0, max_len, causal, mask)
        self.mix = nn.Linear(d, d, bias=bias)

    def taps(self, n, like: torch.Tensor) -> torch.Tensor:
        """The kernel in fft_conv's circular layout [2 n, d]."""
        lag, i = lags(n, like.device, like.dtype)
        keep = (i < n) if self.causal else (i != n)
        return self.kernel(lag, keep)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        mask = None if ctx is None else ctx.mask
        if mask is not None and not (self.causal and ctx.right_padded):  # a causal token never reads its right
            x = x * mask[..., None].to(x.dtype)
        if ctx is not None and ctx.cache is not None:
            key, m = slot(ctx, self), x.shape[1]
            old = ctx.cache.caches.get(key)
            x = x.clone() if old is None else torch.cat((old, x), 1)  # its own storage: the state's bytes
            ctx.cache.caches[key] = x
            return self.mix(fft_conv(x, self.taps(x.shape[1], x))[:, x.shape[1] - m:])
        return self.mix(fft_conv(x, self.taps(x.shape[1], x)))
