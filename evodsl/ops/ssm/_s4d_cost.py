"""The cost of ssm(s4d) (s4d.py), from the form that runs: t = b n tokens, H = d channels, M = N/2 complex modes,
c kernels (1 causal, 2 bidirectional: both in one two-sided kernel), U = t d elements.

The layer (D x, GELU, the output GLU, the FFT convolution) is _conv_layer_cost.py's; the kernel's construction
(_s4d_kernel.py, shared by ssm(h3) and ssm(bigs)) runs by blocks of T = 2 ceil(sqrt(n)) lags, nb = ceil(n / T) of
them, nf = floor(n / T) whole: FLOPs in matmuls, the whole blocks' coefficients [H, c nf, 2M] by the first block's
Vandermonde [H, 2M, T] and the last block's [H, c, 2M] by its r lags (4 c H M n in all), backward twice; other
FLOPs, the powers' exp, cos, sin and products (8 an element of [H, M, T] and [H, M, nb]) and the coefficients'
complex products (6 c H M nb).
Kept for backward: the discretisation's [H, M] tensors (14 of them, as it runs) and dt [H] twice; the block's
exp(a t), w t, their cos and sin ([H, M, T] each) and V [H, 2M, T], the lags t [T]; the block powers' exp(a kT),
w kT, cos, sin and products ([H, M, nb] each) and dA^(kT) [H, M, nb] complex, the lags kT [nb]; 2 C~ as two real
[c, H, M] and complex; the coefficients (2 c H M nb reals).
Inference peak: the larger of V's construction (exp(a t), w t, the two products and V: 6 [H, M, T]) and the
products (V, 2 C~, dA^(kT), the whole blocks' coefficients, their product [c, H, nf T], the last block's, and their
cat [c, H, n] when a partial block follows), beside a, w, c_r, c_i. The built kernel [c, H, n] is held
through the convolution.
Decoding: the state h [b, d, M] complex, whatever n.
"""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..cost import Cost
from ..longconv._conv_layer_cost import conv_layer_cost
from ..registry import OpEnv


def kernel_blocks(n):
    """(T, nb, nf): the lags a block (_s4d_kernel.block_of), the blocks (the last one partial unless T divides n), the
    whole ones."""
    T = 2 * sp.ceiling(sp.sqrt(n))
    return T, sp.ceiling(n / T), sp.floor(n / T)


def s4d_kernel_cost(H, M, c, s):
    """c S4D kernels of H channels and M modes at length s.n: (their Cost, the construction's inference peak, the
    bytes of the built kernel)."""
    n, by = s.n, s.bytes
    T, nb, nf = kernel_blocks(n)
    tail = sp.Min(1, n - nf * T)  # 1 when a partial block follows the whole ones: its product, then a cat
    vand = 4 * c * H * M * n
    other = 8 * H * M * (T + nb) + 6 * c * H * M * nb
    saved = 6 * H * M * T + (8 + 2 * c) * H * M * nb + (14 + 4 * c) * H * M + 2 * H + T + nb
    peak = sp.Max(6 * H * M * T + T, 2 * H * M * T + 2 * c * H * M + 2 * H * M * nb + 2 * c * H * M * nf
                  + c * H * n * (1 + tail))
    kernel = Cost(params=(2 + 2 * c) * H * M + H, fwd=vand, bwd=2 * vand, fwd_other=other, bwd_other=2 * other,
                  saved=saved * by)
    return kernel, (peak + (2 + 2 * c) * H * M) * by, c * H * n * by


def s4d_cost(p, env: OpEnv, s) -> Cost:
    H, M, c = s.d, s.sym("M", p.N // 2), 1 if env.causal else 2
    kernel, peak, alive = s4d_kernel_cost(H, M, c, s)
    cost = conv_layer_cost(p.glu, env.causal, s, kernel, peak, alive)
    return replace(cost, cache=s.b * H * M * 2 * s.bytes)
