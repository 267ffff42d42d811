"""The cost of ssm(s4d) (s4d.py), from the form that runs: t = b n tokens, H = d channels, M = N/2 complex modes,
c kernels (1 causal, 2 bidirectional: both in one two-sided kernel), U = t d elements.

FLOPs in matmuls: the Vandermonde product C~ V (real: [c, H, 2M] by [H, 2M, n], 4 c H M n) and
the output linear d -> 2d (glu) or d -> d; backward twice each. Other FLOPs: the FFT convolution (_fftconv_cost.py),
the Vandermonde's exp, cos, sin and products (8 an element of [H, M, n]), ~10 t d for D x, GELU and GLU.
Kept for backward: the FFT convolution's tensors, the Vandermonde's exp(a l), w l, its cos and sin ([H, M, n] each)
and V [H, 2M, n], the positions [n], the discretisation's [H, M] tensors (14 of them, as it runs), dt [H] twice, C~
[c, H, 2M], GELU's input, the output linear's input (a contiguous copy) and the GLU's input.
Inference peak, the largest of three phases (less the output, which the harness counts apart): the Vandermonde
(exp(a l), w l, the two products and V: 6 [H, M, n], beside ~11 [H, M]), the spectral product (the kernel, both spectra and their product), the output
linear (the convolution's [b, d, 2n] result, the linear's input copy, its product and its bias sum).
Backward's peak (fitted to the storage tracker at b 1..4, n 16..128, d 16..96): 5 U (7 U without the GLU) less 2 d n, the r2c's complex
[b, d, 2n] gradient and its transform, less the kernel's spectra released by then.
Decoding: the state h [b, d, M] complex, whatever n.
"""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, linear
from ..longconv._fftconv_cost import fft_flops, fft_saved
from ..registry import OpEnv


def s4d_cost(p, env: OpEnv, s) -> Cost:
    d = env.d
    b, n, by = s.b, s.n, s.bytes
    H, M, c = s.d, s.sym("M", p.N // 2), 1 if env.causal else 2
    t = b * n
    U = t * H * by
    vand = 4 * c * H * M * n
    out = linear(s, s.d, 2 * d if p.glu else d, True)
    other = fft_flops(b * H, H, n) + 8 * H * M * n + 10 * t * H
    kernel = Cost(params=2 * H * M + H + 2 * c * H * M, fwd=vand, bwd=2 * vand, fwd_other=other, bwd_other=2 * other)
    total = kernel + Cost(params=H) + out
    saved = (fft_saved(b * H, H, n, by) + 6 * H * M * n * by + n * by + (14 + 2 * c) * H * M * by + 2 * H * by
             + 2 * U + (2 * U if p.glu else 0))
    phases = sp.Max(6 * H * M * n * by + 11 * H * M * by + n * by,
                    c * H * n * by + (2 * H * n * by if c == 2 else 0) + 4 * b * H * (n + 1) * by + 2 * H * (n + 1) * by,
                    (7 if p.glu else 5) * U)
    return Cost(params=total.params, fwd=total.fwd, bwd=total.bwd, fwd_other=total.fwd_other,
                bwd_other=total.bwd_other, saved=saved, saves_input=True, peak=phases - U,
                bwd_peak=(5 if p.glu else 7) * U - 2 * H * n * by, cache=b * H * M * 2 * by)
