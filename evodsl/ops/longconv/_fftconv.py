"""The long convolution shared by the longconv and ssm layers (s4d, h3, bigs, hyena, long, sgconv), by FFT.

Causal: y_t = sum_{s <= t} k_s u_{t-s}. Bidirectional (a two-sided kernel): y_t = sum_{s <= t} k_s u_{t-s}
+ sum_{1 <= s < n - t} k'_{s-1} u_{t+s}, k' the anticausal taps (k'_j weighs u_{t+j+1}). Both run as one circular
convolution of length 2n (u padded by n zeros, so nothing wraps): the causal taps at 0..n-1, the anticausal ones
at 2n - 1 .. n (lag -n reads only the padding). O(n log n) per channel; the kernel of length n is the only long
tensor beside the input. causal_tail is the direct form of the decoding step: the outputs at the last m positions of a history.
"""
from __future__ import annotations

import torch


def two_sided(k: torch.Tensor, k_back: torch.Tensor) -> torch.Tensor:
    """[..., 2n]: the causal taps k [..., n], then the anticausal taps k_back [..., n] reversed (no slice at n: a
    symbolic n exports)."""
    return torch.cat((k, k_back.flip(-1)), -1)  # k_back's last tap sits at lag -n, on the padding: it reads zeros


def fft_conv(u: torch.Tensor, k: torch.Tensor, k_back: torch.Tensor | None = None) -> torch.Tensor:
    """u [..., c, n], k [c, n] (causal taps, lag 0..n-1), k_back [c, n] (anticausal taps, lag -1..-n) or None:
    y [..., c, n] by rfft of length 2n."""
    if u.dtype in (torch.float16, torch.bfloat16):  # no half-precision FFT of every length: in float32
        return fft_conv(u.float(), k.float(), None if k_back is None else k_back.float()).to(u.dtype)
    n = u.shape[-1]
    kk = k if k_back is None else two_sided(k, k_back)
    y = torch.fft.irfft(torch.fft.rfft(u, n=2 * n) * torch.fft.rfft(kk, n=2 * n), n=2 * n)
    return y[..., :n]


def causal_tail(hist: torch.Tensor, k: torch.Tensor, m: int) -> torch.Tensor:
    """The causal convolution's outputs at the last m of the t positions of hist [..., c, t] (k [c, >= t]): one
    position by the direct sum over the history, O(t) (a decoding step); several by FFT over the history."""
    t = hist.shape[-1]
    if m == 1:
        return (hist.flip(-1) * k[:, :t]).sum(-1, keepdim=True)
    return fft_conv(hist, k[:, :t])[..., t - m:]
