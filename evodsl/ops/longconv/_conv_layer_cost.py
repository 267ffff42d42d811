"""The cost of the layer around a long convolution (_conv_layer.py): D x, GELU, the output linear (and GLU), the FFT
convolution (_fftconv_cost.py), given what the kernel's construction adds. t = b n tokens, H = d channels,
U = t d elements.

Kept for backward: the FFT convolution's tensors, GELU's input, the output linear's input (a contiguous copy of the
transposed [b, d, n]) and the GLU's input. Inference peak (less the output, which the harness counts apart): the
largest of the kernel's construction (`kernel_peak`), the spectral product (the kernel as built, `kernel_alive`, the
two-sided one when bidirectional, both spectra and their product) and the output linear (the convolution's
[b, d, 2n] result, the linear's input copy, its product and its bias sum: 7 U, 5 U without the GLU). Backward's peak
(fitted to the storage tracker at b 1..4, n 16..128, d 16..96): 5 U (7 U without the GLU) less 2 d n: the r2c's
complex [b, d, 2n] gradient and its transform, less the kernel's spectra released by then.
"""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, linear
from ._fftconv_cost import fft_flops, fft_saved


def conv_layer_cost(glu: bool, causal: bool, s, kernel: Cost, kernel_peak, kernel_alive) -> Cost:
    """kernel: the construction's params, FLOPs and saved bytes; kernel_peak: its inference peak; kernel_alive: the
    bytes of the built kernel held through the convolution."""
    b, n, by, H = s.b, s.n, s.bytes, s.d
    t = b * n
    U = t * H * by
    other = fft_flops(b * H, H, n) + 10 * t * H
    layer = Cost(params=H, fwd_other=other, bwd_other=2 * other,
                 saved=fft_saved(b * H, H, n, by) + 2 * U + (2 * U if glu else 0))
    total = kernel + layer + linear(s, s.d, 2 * H if glu else H, True)
    spectra = kernel_alive + (0 if causal else 2 * H * n * by) + 4 * b * H * (n + 1) * by + 2 * H * (n + 1) * by
    peak = sp.Max(kernel_peak, spectra, (7 if glu else 5) * U) - U
    return Cost(params=total.params, fwd=total.fwd, bwd=total.bwd, fwd_other=total.fwd_other,
                bwd_other=total.bwd_other, saved=total.saved, saves_input=True, peak=peak,
                bwd_peak=(5 if glu else 7) * U - 2 * H * n * by)


def history_cache(s):
    """The decoding history of the layer's inputs: b d n, growing with n."""
    return s.b * s.d * s.n * s.bytes
