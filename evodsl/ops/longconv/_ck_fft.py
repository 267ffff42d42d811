"""The FFT convolution of the continuous-kernel layers (ckconv.py, flexconv.py, ccnn.py): a depthwise convolution of
x [b, n, d] with a kernel sampled at every lag the sequence needs, computed as a product of spectra.

    causal:         y_t = sum_{s <= t} k(t - s) x_s              lags 0 .. n - 1
    bidirectional:  y_t = sum_{s < n}  k(t - s) x_s              lags -(n - 1) .. n - 1

Both run one circular convolution of length 2 n (x zero-padded to 2 n, so no output wraps around): the kernel's
2 n taps are laid out circularly, tap i holding lag i for i < n and lag i - 2 n above n (the negative lags;
tap n, lag +-n, is never read and is zeroed, and a causal kernel zeroes every negative lag). `lags(n)` gives that
layout, `fft_conv` the product of spectra: rfft of both over 2 n, multiply, irfft, the first n outputs.
O(b n d log n); no [n, n] tensor. Half precision is computed in float32 (no half FFT on CPU).
"""
from __future__ import annotations

import torch


def lags(n, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The circular layout of 2 n taps: (lag [2 n], the tap index [2 n]); lag i for i < n, i - 2 n above."""
    i = torch.arange(2 * n, device=device)
    return torch.where(i < n, i, i - 2 * n).to(dtype), i


def fft_conv(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """x [b, n, d], k [2 n, d] in lags()'s layout (zero where unused) -> [b, n, d]."""
    n = x.shape[1]
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    kf = torch.fft.rfft(k.to(work.dtype).t(), dim=-1)  # [d, n + 1] complex (the transforms on the last axis:
    xf = torch.fft.rfft(work.transpose(1, 2), n=2 * n, dim=-1)  # [b, d, n + 1]     the exporter's form)
    y = torch.fft.irfft(xf * kf, n=2 * n, dim=-1)  # [b, d, 2 n]
    return y[..., :n].transpose(1, 2).to(x.dtype).contiguous()  # a copy: the [b, d, 2 n] result dies here
