"""The cost of ssm(mamba2) (mamba2.py), from the form that runs (_mamba2_scan.py): t = b n tokens, E = expand d,
H heads of P = E / H, G groups, N the state, C_d = E + 2 G N the convolved channels, T the chunk (T' = min(T, n)).

FLOPs in matmuls: in_proj (d -> E + C_d + H), out_proj; per chunk C B^T (2 b H T^2 N), its product with dt x
(2 b H T^2 P), the chunk's state (2 b H T P N) and, after the first chunk, the carried state read (2 b H T N P);
the depthwise convolution as in ssm(mamba) (FlopCounterMode's backward formula ignores its groups). The last chunk's
state reaches no output in training: its matmul has no backward. Exact when T divides n or n <= T.
Kept for backward: each chunk's three [H, T, T] matrices (the mask L, C B^T, their product), dt x and its decayed
copy, the carried state's read after the first chunk, the projections, the convolution's input and output, B and C
repeated to the heads, dt, and the gated norm's five [b, n, E] tensors. Inference peak and the backward's: fitted
(below). Decoding: the convolution's last k - 1 inputs and the state, b (C_d (k - 1) + E N), whatever n."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv


def mamba2_cost(p, env: OpEnv, s: Symbols) -> Cost:
    from .mamba2 import heads_of

    d = env.d
    b, n, by = s.b, s.n, s.bytes
    E, N, k, T = s.sym("E", p.expand * d), s.sym("N", p.N), s.sym("k", p.conv), s.sym("T", p.chunk)
    H, G = s.sym("H", heads_of(p, d)), s.sym("G", p.groups)
    P = E / H
    t = b * n
    Cd = E + 2 * G * N
    conv = 2 * t * Cd * k
    dwc = Cost(params=Cd * k + (Cd if p.conv_bias else 0), fwd=conv, bwd=conv + conv * Cd,
               bwd_other=t * Cd if p.conv_bias else 0)
    Tn = sp.Min(T, n)
    ssd = 2 * b * n * Tn * H * (N + P) + 2 * t * H * N * P + 2 * b * sp.Max(n - T, 0) * H * N * P
    # the last chunk's state reaches no output in training: its matmul has no backward
    scan = Cost(params=3 * H + E, fwd=ssd, bwd=2 * ssd - 4 * b * Tn * H * N * P)  # dt_bias, A_log, D; norm gain
    total = (linear(s, s.d, E + Cd + H, p.bias) + dwc + scan + linear(s, E, s.d, p.bias))
    tE = t * E * by
    later = sp.Max(n - T, 0)  # tokens in the chunks after the first (which read a carried state)
    saved = (3 * b * H * n * Tn * by + 2 * tE + b * later * E * by + later / T * 2 * b * E * N * by
             + t * (E + Cd + H) * by + b * Cd * (n + k - 1) * by + 2 * t * Cd * by + 2 * t * H * N * by
             + 2 * t * H * by + 5 * tE + t * G * by)
    R = sp.Rational
    # fitted (minimax) to the storage tracker at 18 sizes (E 64..192, H 1..16, G 1..4, N 4..64, T 8..64; within
    # 7 %): the projections' and the convolution's outputs, B and C repeated to the heads, a chunk's [T, T] matrices
    peak = (R(23, 12) * tE + R(16, 5) * t * Cd * by + t * H * N * by + R(17, 4) * b * H * Tn ** 2 * by
            + R(5, 8) * t * G * N * by)
    return Cost(params=total.params, fwd=total.fwd, bwd=total.bwd, fwd_other=total.fwd_other,
                bwd_other=total.bwd_other, saved=saved, saves_input=True, peak=peak, bwd_peak=3 * tE,
                cache=b * (Cd * (k - 1) + E * N) * by)
