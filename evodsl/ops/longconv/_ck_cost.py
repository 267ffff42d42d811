"""The cost of the continuous-kernel convolutions (ckconv, flexconv, ccnn's conv), from the form that runs."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols
from ..registry import OpEnv


def ck_cost(p, env: OpEnv, s: Symbols, mask: bool = False) -> Cost:
    d, b, n, by = s.d, s.b, s.n, s.bytes
    H, L = s.sym("H", p.hidden), p.layers
    P = 2 * n  # kernel taps
    params = (H + H) + (L - 2) * (H * H + H) + (H * d + d) + d * d + (d if getattr(p, "bias", True) else 0) + (2 if mask else 0)
    fwd = 2 * P * H + (L - 2) * 2 * P * H * H + 2 * P * H * d + 2 * b * n * d * d
    bwd = 2 * P * H + (L - 2) * 4 * P * H * H + 4 * P * H * d + 4 * b * n * d * d
    fft = 5 * (2 * b + 1) * d * P * sp.log(P, 2)  # rfft of x and k, irfft (complex-FFT count, 5 L log2 L)
    other = fft + 6 * b * (n + 1) * d + (L - 1) * 2 * P * H + P * d
    c = 2 * by  # a complex element
    spectra = b * (n + 1) * d * c + (n + 1) * d * c  # x's and the kernel's, kept by their product
    saved = (2 * P + 2 * (L - 1) * P * H) * by + P * d * by + 2 * b * n * d * by + spectra + b * n * d * by
    if mask:  # the Gaussian's steps [2 n, 1] and the unmasked kernel [2 n, d]
        saved += 3 * P * by + P * d * by
    peak = P * d * by + spectra + b * (n + 1) * d * c + 2 * b * n * d * by - b * n * d * by
    return Cost(params=params, fwd=fwd, bwd=bwd, fwd_other=other, bwd_other=2 * other, saves_input=False,
                saved=saved, peak=peak, bwd_peak=d * by * (7 * b * n - 2 * n + 2), cache=b * n * d * by)
