"""The cost of the continuous-kernel convolutions (ckconv, flexconv, ccnn's conv), from the form that runs: the
kernel network at P = 2 n taps (SIREN, or flexconv's MAGNet, _magnet.py), then the depthwise FFT convolution and the
pointwise mix (the same for both networks).

Kernel networks (H hidden units, L linear maps), matmul FLOPs as FlopCounterMode counts them:
  SIREN:  W_1 [H, 1] (an addmm), L - 2 maps [H, H], W_L [d, H]; kept: p and each sine's input and output.
  MAGNet: L Gabor filters [P, L, H] at once, elementwise (w, c, gamma, mu: 4 L H parameters, no matmul), L - 1 maps
          [H, H], W_L [d, H]; kept: the six [P, L, H] steps of the filters (p - mu, gamma (p - mu), the window,
          the sine's input, the sine, the filter), each map's output and each product's [P, H], the
          output [P, d]. Non-matmul FLOPs (a convention, not measured): 9 per filter element, one per product.
With FlexConv's mask (both networks): its two parameters; kept: its steps [P, 1] and the unmasked kernel [P, d].
"""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols
from ..registry import OpEnv


def _kernel_net(p, s: Symbols, P):
    """(params, fwd, bwd, other, saved elements) of the kernel network at P taps, without the mask."""
    d, H, L = s.d, s.sym("H", p.hidden), p.layers
    if getattr(p, "kernel", "siren") == "magnet":
        return (4 * L * H + (L - 1) * (H * H + H) + (H * d + d), (L - 1) * 2 * P * H * H + 2 * P * H * d,
                (L - 1) * 4 * P * H * H + 4 * P * H * d, 9 * P * L * H + (L - 1) * P * H,
                6 * P * L * H + 2 * (L - 1) * P * H + 2 * P + P * d)
    return ((H + H) + (L - 2) * (H * H + H) + (H * d + d), 2 * P * H + (L - 2) * 2 * P * H * H + 2 * P * H * d,
            2 * P * H + (L - 2) * 4 * P * H * H + 4 * P * H * d, (L - 1) * 2 * P * H,
            2 * P + 2 * (L - 1) * P * H + P * d)


def ck_cost(p, env: OpEnv, s: Symbols, mask: bool = False) -> Cost:
    d, b, n, by = s.d, s.b, s.n, s.bytes
    P = 2 * n  # kernel taps
    k_params, k_fwd, k_bwd, k_other, k_saved = _kernel_net(p, s, P)
    params = k_params + d * d + (d if getattr(p, "bias", True) else 0) + (2 if mask else 0)
    fwd = k_fwd + 2 * b * n * d * d
    bwd = k_bwd + 4 * b * n * d * d
    fft = sp.Rational(5, 2) * (2 * b + 1) * d * P * sp.log(P, 2)  # rfft of x and k, irfft (5/2 L log2 L: real)
    other = fft + 6 * b * (n + 1) * d + k_other + P * d
    c = 2 * by  # a complex element
    spectra = b * (n + 1) * d * c + (n + 1) * d * c  # x's and the kernel's, kept by their product
    saved = k_saved * by + 2 * b * n * d * by + spectra + b * n * d * by
    if mask:  # the Gaussian's steps [2 n, 1] and the unmasked kernel [2 n, d]
        saved += 3 * P * by + P * d * by
    peak = P * d * by + spectra + b * (n + 1) * d * c + 2 * b * n * d * by - b * n * d * by
    return Cost(params=params, fwd=fwd, bwd=bwd, fwd_other=other, bwd_other=2 * other, saves_input=False,
                saved=saved, peak=peak, bwd_peak=d * by * (7 * b * n - 2 * n + 2), cache=b * n * d * by)
