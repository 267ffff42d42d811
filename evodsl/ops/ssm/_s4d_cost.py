"""The cost of ssm(s4d) (s4d.py), from the form that runs: t = b n tokens, H = d channels, M = N/2 complex modes,
c kernels (1 causal, 2 bidirectional: both in one two-sided kernel), U = t d elements.

The layer (D x, GELU, the output GLU, the FFT convolution) is _conv_layer_cost.py's; the kernel's construction:
FLOPs in matmuls, the Vandermonde product C~ V (real: [c, H, 2M] by [H, 2M, n], 4 c H M n), backward twice; other
FLOPs, its exp, cos, sin and products (8 an element of [H, M, n]). Kept for backward: exp(a l), w l, their cos and
sin products ([H, M, n] each) and V [H, 2M, n], the positions [n], the discretisation's [H, M] tensors (14 of them,
as it runs), dt [H] twice, C~ [c, H, 2M]. Its inference peak: exp(a l), w l, the two products and V (6 [H, M, n])
beside ~11 [H, M]; the built kernel [c, H, n] is held through the convolution.
Decoding: the state h [b, d, M] complex, whatever n.
"""
from __future__ import annotations

from dataclasses import replace

from ..cost import Cost
from ..longconv._conv_layer_cost import conv_layer_cost
from ..registry import OpEnv


def s4d_cost(p, env: OpEnv, s) -> Cost:
    b, n, by = s.b, s.n, s.bytes
    H, M, c = s.d, s.sym("M", p.N // 2), 1 if env.causal else 2
    vand = 4 * c * H * M * n
    kernel = Cost(params=2 * H * M + H + 2 * c * H * M, fwd=vand, bwd=2 * vand, fwd_other=8 * H * M * n,
                  bwd_other=16 * H * M * n,
                  saved=6 * H * M * n * by + n * by + (14 + 2 * c) * H * M * by + 2 * H * by)
    cost = conv_layer_cost(p.glu, env.causal, s, kernel, 6 * H * M * n * by + 11 * H * M * by + n * by, c * H * n * by)
    return replace(cost, cache=b * H * M * 2 * by)
