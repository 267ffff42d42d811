"""The cost of longconv(hyena) (hyena.py), from the form that runs: t = b n tokens, N = order, C = (N + 1) d streams,
F = filter_order, E = emb features, s short taps, U = t d elements.

FLOPs in matmuls: in_proj (d -> C), out_proj, the filter's FFN on the n positions (E -> F, F -> F twice, F -> N d;
its first layer's input is a constant: backward the weight's gradient only); the depthwise short convolution, 2 t C s
forward and as much for its input's gradient, and for its weight's gradient what FlopCounterMode counts, 2 t C s * C
(its formula ignores groups, as in ssm(mamba)). Other FLOPs: N FFT convolutions (_fftconv_cost.py), the features,
sin and the window (~4 n (F + N d)), ~5 t d a gate.
Kept for backward: the short convolution's padded input [b, C, n + s - 1] and its output [b, C, n] (the gates and v
are views of it), per long convolution its FFT tensors, its sum (gated) and, past the first, its input (the previous
gate's product); out_proj's input (a contiguous copy); the filter's features [n, E], 9 [n, F] (three layers: the
linear's output, its frequency product, sin's input) and the window [n, N d].
Inference peak (less the output, which the harness counts apart): the larger of the short convolution (its input,
its padded copy, its output: (N + 1) (2 U + b d (n + s - 1))) and the last long convolution's spectral product (the
short convolution's output, the filters [N d, n], the previous gate's product (N >= 2), both spectra and their
product). Backward's peak (fitted to the storage tracker at b 1..4, n 16..128, d 16..96, N 1..3): 6 U (7 U from
N = 2) less 2 d n.
Decoding: the short convolution's last s - 1 inputs [b, C, s - 1] and N histories [b, d, t]: it grows with t.
"""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, linear
from ..registry import OpEnv
from ._fftconv_cost import fft_flops, fft_saved


def hyena_cost(p, env: OpEnv, s) -> Cost:
    d = env.d
    b, n, by = s.b, s.n, s.bytes
    N, F, E, k = p.order, s.sym("F", p.filter_order), s.sym("E", p.emb), s.sym("s", p.short)
    C = (N + 1) * s.d
    t = b * n
    U = t * s.d * by
    conv = 2 * t * C * k
    short = Cost(params=C * k + C, fwd=conv, bwd=conv + conv * C, bwd_other=t * C)
    first = Cost(params=E * F + F, fwd=2 * n * E * F, bwd=2 * n * E * F)
    ffn = first + linear(s, F, F, True, tokens=n).scaled(2) + linear(s, F, N * d, False, tokens=n)
    other = N * fft_flops(b * s.d, s.d, n) + 4 * n * (F + N * s.d) + 5 * N * t * s.d
    total = (linear(s, s.d, C, True) + short + ffn + Cost(params=F + N * s.d, fwd_other=other, bwd_other=2 * other)
             + linear(s, s.d, s.d, True))
    saved = (b * C * (n + k - 1) * by + t * C * by + N * fft_saved(b * s.d, s.d, n, by) + N * U + (N - 1) * U + U
             + n * E * by + 9 * n * F * by + N * s.d * n * by)
    spectral = (N + 1) * U + N * s.d * n * by + (U if N >= 2 else 0) + 4 * b * s.d * (n + 1) * by + 2 * s.d * (n + 1) * by
    early = (N + 1) * (2 * U + b * s.d * (n + k - 1) * by)
    return Cost(params=total.params, fwd=total.fwd, bwd=total.bwd, fwd_other=total.fwd_other,
                bwd_other=total.bwd_other, saved=saved, saves_input=True, peak=sp.Max(spectral, early) - U,
                bwd_peak=(7 if N >= 2 else 6) * U - 2 * s.d * n * by,
                cache=b * C * (k - 1) * by + N * b * s.d * n * by)
