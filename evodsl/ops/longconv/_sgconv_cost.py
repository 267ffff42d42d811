"""The cost of longconv(sgconv) (sgconv.py): the layer (_conv_layer_cost.py) around its kernel, c = 1 (causal) or 2
sets of S sub-kernels [c, d, k], K of T = k 2^(S-1) taps (whatever n: the kernel is built whole). Its construction
keeps nothing for backward (the interpolations and scalings need only shapes; the norm is a buffer); its peak is
the upsampled parts (T - 2k), the scaled ones (T) and their concatenation (T), c d each; the built kernel [c, d, T]
is held through the convolution. Its elementwise FLOPs (~6 c d T: interpolation, scaling, the norm) are other FLOPs.
Decoding: the history of the inputs [b, d, t], which grows with the length.
"""
from __future__ import annotations

import math
from dataclasses import replace

from ..cost import Cost
from ._conv_layer_cost import conv_layer_cost, history_cache


def scales(L: int, k: int) -> int:
    """S = 1 + ceil(log2(L / k)): k 2^(S-1) >= L."""
    return 1 + max(0, math.ceil(math.log2(L / k)))


def sgconv_cost(p, env, s):
    c, by, d = 1 if env.causal else 2, s.bytes, s.d
    S = scales(p.max_len, p.kernel_dim)
    k = s.sym("k", p.kernel_dim)
    T = k * 2 ** (S - 1)
    kernel = Cost(params=c * d * S * k, fwd_other=6 * c * d * T, bwd_other=12 * c * d * T)
    cost = conv_layer_cost(p.glu, env.causal, s, kernel, (3 * T - 2 * k) * c * d * by, c * d * T * by)
    return replace(cost, cache=history_cache(s))
