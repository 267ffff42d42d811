"""The cost of ssm(s4d) (s4d.py), from the form that runs: t = b n tokens, H = d channels, M = N/2 complex modes,
c kernels (1 causal, 2 bidirectional: both in one two-sided kernel), U = t d elements.

The layer (D x, GELU, the output GLU, the FFT convolution) is _conv_layer_cost.py's; the kernel's construction
(_s4d_kernel.py, shared by ssm(h3) and ssm(bigs)) runs by blocks of T = 2 ceil(sqrt(n)) lags, nb = ceil(n / T) of
them covering L = nb T >= n lags: FLOPs in matmuls, the blocks' coefficients [H, c nb, 2M] by the first block's
Vandermonde [H, 2M, T] (4 c H M L), backward twice; other FLOPs, the powers' exp, cos, sin and products (8 an element
of [H, M, T] and [H, M, nb]) and the coefficients' complex products (6 c H M nb).
Kept for backward: the discretisation's [H, M] tensors (14 of them, as it runs) and dt [H] twice; the block's
exp(a t), w t, their cos and sin ([H, M, T] each) and V [H, 2M, T], the lags t [T]; dt A complex, 2 C~ as two real
[c, H, M] and complex, the block powers dA^(kT) [H, M, nb] complex and the lags kT [nb]; the coefficients
[H, c nb, 2M]. Inference peak: the larger of V's construction (exp(a t), w t, the two products and V: 6 [H, M, T])
and the matmul (V, dA^(kT), 2 C~, the coefficients and the product [H, c nb, T]), beside a, w, c_r, c_i. The built
kernel, a view of the product (c H L), is held through the convolution.
Decoding: the state h [b, d, M] complex, whatever n.
"""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..cost import Cost
from ..longconv._conv_layer_cost import conv_layer_cost
from ..registry import OpEnv


def kernel_blocks(n):
    """(T, nb, L): the lags a block (_s4d_kernel.block_of), the blocks, the lags they cover."""
    T = 2 * sp.ceiling(sp.sqrt(n))
    nb = sp.ceiling(n / T)
    return T, nb, nb * T


def s4d_kernel_cost(H, M, c, s):
    """c S4D kernels of H channels and M modes at length s.n: (their Cost, the construction's inference peak, the
    bytes of the built kernel)."""
    n, by = s.n, s.bytes
    T, nb, L = kernel_blocks(n)
    vand = 4 * c * H * M * L
    other = 8 * H * M * (T + nb) + 6 * c * H * M * nb
    saved = 6 * H * M * T + (2 + 2 * c) * H * M * nb + (15 + 4 * c) * H * M + 2 * H + T + nb
    peak = sp.Max(6 * H * M * T + T, 2 * H * M * T + 2 * (1 + c) * H * M * nb + 2 * c * H * M + c * H * L + nb)
    kernel = Cost(params=(2 + 2 * c) * H * M + H, fwd=vand, bwd=2 * vand, fwd_other=other, bwd_other=2 * other,
                  saved=saved * by)
    return kernel, (peak + (2 + 2 * c) * H * M) * by, c * H * L * by


def s4d_cost(p, env: OpEnv, s) -> Cost:
    H, M, c = s.d, s.sym("M", p.N // 2), 1 if env.causal else 2
    kernel, peak, alive = s4d_kernel_cost(H, M, c, s)
    cost = conv_layer_cost(p.glu, env.causal, s, kernel, peak, alive)
    return replace(cost, cache=s.b * H * M * 2 * s.bytes)
