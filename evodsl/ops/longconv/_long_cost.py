"""The cost of longconv(long) (long.py): the layer (_conv_layer_cost.py) around its kernel, c = 1 (causal) or 2
kernels [c, d, L] (L = max_len) of which the first n + p taps are read (p = smooth // 2). The kernel's construction:
the average pool over [c, d, n + p], |K| - lam, relu and the sign's product on [c, d, n]; kept for backward the
pool's output (a view the absolute value keeps) and two [c, d, n] (relu's output, the sign); its peak ~4 of them;
the built kernel [c, d, n] is held through the convolution. Its elementwise FLOPs (~(smooth + 4) c d n) are other
FLOPs. Decoding: the history of the inputs [b, d, t], which grows with the length.
"""
from __future__ import annotations

from dataclasses import replace

from ..cost import Cost
from ._conv_layer_cost import conv_layer_cost, history_cache


def long_cost(p, env, s):
    c, by, n, d = 1 if env.causal else 2, s.bytes, s.n, s.d
    q = p.smooth // 2
    cdn = c * d * n
    kernel = Cost(params=c * d * s.sym("L", p.max_len), fwd_other=(p.smooth + 4) * cdn, bwd_other=2 * (p.smooth + 4) * cdn,
                  saved=(2 * cdn + (c * d * (n + q) if q else 0)) * by)
    cost = conv_layer_cost(p.glu, env.causal, s, kernel, 4 * c * d * (n + q) * by, cdn * by)
    return replace(cost, cache=history_cache(s))
