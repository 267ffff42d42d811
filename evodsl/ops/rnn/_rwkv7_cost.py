"""The cost of rnn(rwkv7) (rwkv7.py), from the form that runs: the chunked diagonal-plus-rank-one kernel of
_dplr.py on H heads of N channels, the projections and LoRAs around it. t = b n tokens; Dw, Da, Dg the LoRA ranks;
per head Nr = m T' rows (the last chunk padded), T' = min(chunk, n).

Kernel FLOPs (matmuls, per head): the queries r and the reads beta against [alpha; k] ([T', 2 T'] each: 8 Nr T' N),
the values' parts of the reads and the outputs (4 Nr T' N), then in the loop W S and r S (4 Nr N^2), the outputs'
rank-one part (2 Nr T' N) and the state's update from [U; V] (4 Nr N^2); the triangular solve is no matmul (not
counted). Backward: each product twice, but the first chunk's W S and r S (a zero state: one gradient) and the last
chunk's update (the state after it is not read), and the solve's gradient for the triangle, -grad [U0, W] [U0, W]^T
(2 Nr T' 2N). Other FLOPs (a convention): ~40 t d for the shift, the six lerps, sigmoids, the normalised key, the
bonus and the GroupNorm; backward twice that.
Memory (elements; tD = t d, K = b H m T'^2 the chunks' [T', T'] blocks, Z = b H m N^2 the states before every
chunk, P = b (m T' - n) d the padding, S = b H N^2 one state, E = b m T' d with several chunks, tH = t H): fitted
by least squares to the storage tracker at 14 sizes (b 1..3, n 20..72, d 32..128, T 5..64, N 4..64, LoRA ranks 2..128;
saved within 2 %, the inference peak within 7 %). Kept: ~36 tD (the shift's difference, the six lerps' inputs, the
maps' and LoRAs' inputs, sigmoid's and tanh's outputs, the normalised key and its norm, the chunked r, k, v, g,
alpha, beta and their decayed copies, exp(B), exp(-B), exp(B_C - B), the GroupNorm's input and output, the bonus,
W_o's input), 17 P, 5 K (the [T', 2 T'] blocks, their masks, the triangle), 1.5 Z (the states before every chunk),
t (Dw + Da + Dg), 4 E (the decays into the state), 13 tH (the norms, the bonus' sums, the GroupNorm's statistics),
less one state. Inference peak: 36 tD + 68 P + 7.5 K + 3 S + 12 tH + 0.3 t (Dw + Da + Dg) - 2 E. The backward's
peak is modelled as the input's gradient and one more (2 tD) or the blocks' gradients (2.5 K) when those lead: it
holds within 10 % where either clearly leads (K <= 0.7 tD, or one chunk of T' = 2 N), and misses by up to 50 % where
blocks, states and the per-chunk gradients are alike (K ~ Z ~ tD with several chunks): not modelled further.
"""
from __future__ import annotations

import sympy as sp

from ..attention._recurrent_cost import chunk_symbols
from ..cost import Cost, Symbols, linear
from ..registry import OpEnv


def dplr_kernel_flops(b, H, rows, C, N, several):
    f = b * H * rows
    fwd = 8 * f * C * N + 4 * f * C * N + 8 * f * N * N + 2 * f * C * N
    bwd = (16 * f * C * N + 8 * f * C * N + 4 * f * C * N + 4 * b * H * C * N * N
           + 16 * b * H * (rows - C) * N * N + 4 * f * C * N)
    return fwd, bwd


def rwkv7_cost(p, env: OpEnv, s: Symbols) -> Cost:
    b, n, by, d = s.b, s.n, s.bytes, s.d
    N = s.sym("N", p.head_size)
    H = d / N
    Dw, Da, Dg = s.sym("Dw", p.decay_rank), s.sym("Da", p.a_rank), s.sym("Dg", p.gate_rank)
    C, m, rows, several, padded = chunk_symbols(p, s)
    kf, kb = dplr_kernel_flops(b, H, rows, C, N, several)
    t = b * n
    lin = linear(s, d, d, False)
    projs = lin + lin + lin + lin
    for R in (Dw, Da, Dg):
        projs = projs + linear(s, d, R, False) + linear(s, R, d, False)
    params = 4 * d * d + 2 * (Dw + Da + Dg) * d + 6 * d + 2 * d + 2 * d + d + 2 * d  # maps, LoRAs, mixes, w0 a0,
    # k_k k_a, r_k, GroupNorm
    other = 40 * t * d
    tD, P, K, Z = t * d, b * (rows - n) * d, b * H * m * C ** 2, b * H * m * N ** 2
    S, E, tH, tR = b * H * N ** 2, several * b * rows * d, t * H, t * (Dw + Da + Dg)
    saved = 36 * tD + 17 * P + 5 * K + sp.Rational(3, 2) * Z + tR + 4 * E + 13 * tH - S
    peak = 36 * tD + 68 * P + sp.Rational(15, 2) * K + 3 * S + 12 * tH + sp.Rational(3, 10) * tR - 2 * E
    return Cost(params=params, fwd=projs.fwd + kf, bwd=projs.bwd + kb, fwd_other=other, bwd_other=2 * other,
                saves_input=False, saved=saved * by, peak=peak * by,
                bwd_peak=sp.Max(2 * tD, sp.Rational(5, 2) * K) * by,
                cache=b * (d + H * N ** 2) * by)
