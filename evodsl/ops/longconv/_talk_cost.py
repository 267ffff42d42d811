"""The cost of longconv(talk) (talk.py), from the form that runs: t = b n d elements, H heads, k = 1 interpolated
bound (causal: the right one is a whole row of the table) or 2.

FLOPs in matmuls: the offsets' map d -> 2 H and the output map d -> d. Other FLOPs (a convention): the cumulative
sum, four gathers, the interpolations and the difference, the bounds. Kept for backward: the sigmoid's output
[b, n, 2 H], each interpolated bound's clamp input, floor fraction [b, n, H] and int64 gather indices (two), the
prefix table [b, n + 1, d], each interpolation's difference of neighbours [t], the output map's input [t]. The
inference peak (fitted to the storage tracker): the table beside an interpolation's neighbours, its product and the
result (3 t; bidirectional, the first bound's result too) and the bounds' [b, n, H] tensors (three, and two int64). The backward's peak (wrt the input): three [t] gradients and a bound's (fitted to the
storage tracker at b 1..3, n 16..64, H 1..16). Decoding: the last l_max inputs."""
from __future__ import annotations

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv


def talk_cost(p, env: OpEnv, s: Symbols) -> Cost:
    d, b, n, by = s.d, s.b, s.n, s.bytes
    H = s.sym("H", p.heads)
    t = b * n * d
    proj = linear(s, d, 2 * H, True) + linear(s, d, d, p.bias)
    k = 1 if env.causal else 2  # interpolated bounds
    saved = (2 * b * n * H + k * b * n * H + b * (n + 1) * d + k * (t + b * n * H) + t) * by + 2 * k * b * n * H * 8
    peak = (b * (n + 1) * d + (3 if env.causal else 4) * t + 3 * b * n * H + n) * by + 16 * b * n * H
    other = t + 4 * t + 6 * t + 8 * b * n * H  # cumsum, 4 gathers, 2 interpolations and the difference, bounds
    return Cost(params=proj.params, fwd=proj.fwd, bwd=proj.bwd, fwd_other=other, bwd_other=2 * other + proj.bwd_other,
                saves_input=True, saved=saved, peak=peak, bwd_peak=(3 * t + b * n * H) * by, cache=b * p.l_max * d * by)
