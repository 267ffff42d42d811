"""The cost of one FFT convolution (_fftconv.py) over R rows (b c) of c channels, length n, padded to 2n.

No matmuls. A real FFT of length L costs 5/2 L log2 L FLOPs (half the radix-2 complex count): the input's rfft, the
kernel's (c rows) and the product's irfft, plus 6 FLOPs a complex product; backward, the adjoint transforms of each,
twice that. Kept for backward (torch's r2c keeps its padded input, the product both spectra): the input padded to 2n
[R, 2n] real, the kernel padded [c, 2n] and both spectra [R, n + 1], [c, n + 1] complex.
"""
from __future__ import annotations

import sympy as sp


def fft_flops(R, c, n):
    L = 2 * n
    return sp.Rational(5, 2) * L * sp.log(L, 2) * (2 * R + c) + 6 * R * (n + 1)


def fft_saved(R, c, n, by):
    return (R + c) * 2 * n * by + (R + c) * (n + 1) * 2 * by
