"""The cost of ssm(h3) (h3.py), from the form that runs: t = b n tokens, G = head_dim, H = d / G heads, M = N/2
modes, s shift taps, U = t d elements; the diagonal SSM runs on R = b G d rows (b G^2 per head).

FLOPs in matmuls: W_q, W_k, W_v, W_o; the S4D Vandermonde (4 H M n, _s4d_cost.py); the shift SSM, a depthwise
convolution: 2 t d s forward and as much for its input's gradient, and for its weight's gradient what
FlopCounterMode counts, 2 t d s * d (its formula ignores groups, as in ssm(mamba)). Other FLOPs: the FFT convolution
over R rows, the Vandermonde's exp, cos, sin, the outer products and the q contraction (~4 t d G).
Kept for backward: k padded [b, d, n + s - 1] and the flipped taps [d, s], k, k~ and v (5 U with q, o's input and
the head views), kv and y (G U each), the kernel's tensors (as _s4d_cost.py) and the FFT convolution's.
Inference peak (less the output, which the harness counts apart): with k, k~, v and kv alive ((3 + G) U), the larger
of the kernel's construction (by blocks, _s4d_cost.py) and the spectral product (both spectra over R rows and their
product). Backward's peak (fitted to the storage tracker at b 1..4, n 16..128, d 16..96, G 1..2): 6 G U + (2 G - 4)
d n. Decoding: the shift register [b, d, s - 1] and the state [b, G^2, H, M] complex, whatever n.
"""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, linear
from ..longconv._fftconv_cost import fft_flops, fft_saved
from ..registry import OpEnv
from ._s4d_cost import s4d_kernel_cost


def h3_cost(p, env: OpEnv, s) -> Cost:
    b, n, by, d = s.b, s.n, s.bytes, s.d
    G, H = p.head_dim, s.sym("H", env.d // p.head_dim)
    M, k = s.sym("M", p.N // 2), s.sym("s", p.shift)
    t = b * n
    U = t * d * by
    R = b * G * d
    conv = 2 * t * d * k
    kernel, kernel_peak, kernel_alive = s4d_kernel_cost(H, M, 1, s)
    other = fft_flops(R, H, n) + 4 * t * d * G + 2 * t * d
    core = Cost(params=d * k + d + H, fwd=conv, bwd=conv + conv * d, fwd_other=other, bwd_other=2 * other) + kernel
    total = linear(s, d, d, True).scaled(4) + core
    saved = b * d * (n + k - 1) * by + d * k * by + 5 * U + 2 * G * U + kernel.saved + fft_saved(R, H, n, by)
    alive = (3 + G) * U
    phases = sp.Max(kernel_peak, kernel_alive + 4 * R * (n + 1) * by + 2 * H * (n + 1) * by)
    return Cost(params=total.params, fwd=total.fwd, bwd=total.bwd, fwd_other=total.fwd_other,
                bwd_other=total.bwd_other, saved=saved, saves_input=True, peak=alive + phases - U,
                bwd_peak=6 * G * U + (2 * G - 4) * d * n * by,
                cache=b * d * (k - 1) * by + b * G * G * H * M * 2 * by)
