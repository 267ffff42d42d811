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
peak is derived from the code path (_bwd_peak, each term naming its tensors): exact at the storage tracker in 26 builds
(b 1..3, n 32..70, d 32..128, T 5..64, N 8..96; one head and many, one chunk, two to six, padded last chunks).
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
    bwd_peak = _bwd_peak(b, H, N, m, T=b * rows * d, tD=tD, tH=tH, K=K, S=S, several=several, padded=padded)
    return Cost(params=params, fwd=projs.fwd + kf, bwd=projs.bwd + kb, fwd_other=other, bwd_other=2 * other,
                saves_input=False, saved=saved * by, peak=peak * by, bwd_peak=bwd_peak * by,
                cache=b * (d + H * N ** 2) * by)


def _bwd_peak(b, H, N, m, T, tD, tH, K, S, several, padded):
    """The backward's peak (elements), read off the code path of rwkv7.py and _dplr.chunked_dplr: the Max over the
    moments where it can lead, each the gradients alive then less the saved tensors released by then. T is a chunked
    head tensor (padded rows included), t1 = T / m and k1 = K / m one chunk's share."""
    t1, k1, one = T / m, K / m, 1 - several
    many_heads, batched = sp.Min(1, H - 1), sp.Min(1, b - 1)
    # v's chunks are a view of v; matmul copies them for bmm unless the batch dimensions merge (one head; or b = 1 in
    # one chunk); padded, the kernel keeps v's padded copy: either way the bonus held the original alone
    v_in_place = 1 - many_heads * (1 - one * (1 - batched))
    # the GroupNorm reads the kernel's stacked output as a view (one head; padded, b = 1 only), else a copy of it
    gn_view = (1 - many_heads) * (1 - padded * batched)
    # rq (r * exp(B), r's head-strided layout): each chunk's rqc @ s copies its chunk (b > 1, many heads, unpadded), or
    # reads a view of rq itself (b = 1), which then is released after the loop
    rq_copies = (1 - padded) * many_heads * batched
    rq_viewed = (1 - padded) * many_heads * (1 - batched)
    # the output side's saved tensors, released before the kernel's backward: W_o's input (o g), g, o (the norm's
    # output plus the bonus), r r_k (the bonus), the GroupNorm's input (the stack, or its copy), its mean and rstd and
    # the bonus' sum (3 tH); v (unless the kernel reads it in place); padded, r and k too (the kernel keeps copies)
    out_rel = (4 * tD + gn_view * T + (1 - gn_view) * tD + 3 * tH + (1 - (1 - padded) * v_in_place) * tD
               + 2 * padded * tD)
    held = 4 * tD  # g's gradient (its branch runs after the kernel's) and the bonus' gradients of r, k, v
    # the loop's saved tensors, all released once it is done: every chunk's U (T in all), the states before each chunk
    # (m S), [U V] for every update (2 T (m - 1) / m), the rqc copies or rq; with several chunks the ends [alpha k]
    # exp(B_C - B) (2 T) and the carries (b H m N)
    loop_rel = (T + rq_copies * T * (m - 1) / m + 2 * T * (m - 1) / m + m * S
                + several * (rq_viewed * T + b * H * m * N + 2 * T))
    # the last chunk (the first the backward meets), at wc @ s: o's gradient (T), the gradients of r_a's and rq's
    # chunks, of U (k1 + 2 t1) and W's chunk (t1), and s's two (2 S, several chunks), its U released
    at_last = held + T + 2 * t1 + k1 + 2 * several * S - out_rel
    # the one before it (three chunks or more), at s's gradient summed: the last chunk's four gradients (3 t1 + k1) and
    # this one's: the update's [U V] and ends' (4 t1), the carry's (b H N), r_a's and U's and rq's (k1 + 2 t1), s's
    # three (3 S); released, the last chunk's U and s and this one's U and [U V] (4 t1 + S) and both rqc copies
    at_second = sp.Min(1, sp.Max(0, m - 2)) * (held + T + 5 * t1 + 2 * k1 + 2 * S + b * H * N - out_rel
                                                - 2 * rq_copies * t1)
    # after the loop (several chunks), at the ends' products: the stacked gradients of U0, W, rq, out_v, v (5 T), r_a
    # (K) and the ends (2 T) and the carries (b H m N), then alpha * tail's and k * tail's two each (4 T)
    at_ends = several * (held + 11 * T + K + b * H * m * N - out_rel - loop_rel)
    # at out_v = r_k @ v's backward: the stacks of U0, W, rq, out_v (and v: several chunks) and r_a, the ends'
    # gradients of alpha, k and tail (3 T, several chunks; exp(B_C - B) released), then v's and r_k's (T + K)
    at_outv = held + (5 + 4 * several) * T + 2 * K - out_rel - loop_rel - several * T
    # one chunk, in the solve's backward: the stacks of rq and r_a (T + K), out_v's gradients (T + K), the solution's
    # gradient [U0 W] (2 T), the right side's (2 T), the triangle's -grad [U0 W]^T and its negation (2 K); released
    # U, the zero state, the masked [C, 2 C] scores (2 K) and r_k @ v's copy of v
    at_solve = one * (held + 5 * T + 2 * K - out_rel - S - (1 - padded) * (1 - v_in_place) * T)
    # the output's backward: W_o's input's gradient, then o g's two (W_o's input released)
    return sp.Max(2 * tD, at_last, at_second, at_ends, at_outv, at_solve)
