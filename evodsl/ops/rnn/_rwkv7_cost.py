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
Memory (elements; tD = t d, T = b m T' d a chunked head tensor, its padding included, K = b H m T'^2 the chunks'
[T', T'] blocks, S = b H N^2 one state, tH = t H): saved and the inference peak are derived from the code path,
each term naming its tensor (_saved, _peak): exact at the saved-tensor hooks and the storage tracker in 22 builds
(b 1..3, n 20..72, d 32..128, T 7..64, N 4..96; one head and many, one chunk, several, a padded last one, the
[T', 2 T'] blocks leading the peak). The backward's peak is derived likewise (_bwd_peak, each term naming its
tensors): exact at the storage tracker in 26 builds (b 1..3, n 32..70, d 32..128, T 5..64, N 8..96; one head and
many, one chunk, two to six, padded last chunks).
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
    tD, T, K, S = t * d, b * rows * d, b * H * m * C ** 2, b * H * N ** 2
    tH, tR = t * H, t * (Dw + Da + Dg)
    saved = _saved(b, H, N, m, C, by, T=T, tD=tD, tH=tH, tR=tR, K=K, S=S, several=several, padded=padded)
    peak = _peak(b, H, N, m, C, by, T=T, tD=tD, K=K, S=S, padded=padded)
    bwd_peak = _bwd_peak(b, H, N, m, T=T, tD=tD, tH=tH, K=K, S=S, several=several, padded=padded)
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


def _saved(b, H, N, m, C, by, T, tD, tH, tR, K, S, several, padded):
    """What rwkv7.py and _dplr.chunked_dplr keep for backward (elements), each tensor named, as the saved-tensor hooks
    see it: a tensor that its own node saves (exp's result) stays with its node even where nothing reads it."""
    many_heads, batched, one = sp.Min(1, H - 1), sp.Min(1, b - 1), 1 - several
    gn_view = (1 - many_heads) * (1 - padded * batched)  # as in _bwd_peak
    v_in_place = 1 - many_heads * (1 - one * (1 - batched))
    rq_copies = (1 - padded) * many_heads * batched
    rq_viewed = (1 - padded) * many_heads * (1 - batched) * several
    # before the kernel: the shift's dx, the inputs of W_r, W_k, W_v and of the three LoRAs (x_w, x_a, x_g), the
    # decay's sigmoid, a, k, k k_k, a - 1 and 1 + (a - 1) k_a (k's factor), kh: 14 tD; the LoRAs' tanh(x_w A_w),
    # x_a A_a and sigmoid(x_g A_g) (t (Dw + Da + Dg)); the norm of k k_k and its clamped, expanded divisor (2 tH)
    before = 14 * tD + tR + 2 * tH
    # the kernel: exp(B), exp(-B), exp(B_{i-1}) (3 T); alpha and beta (2 T; padded, also r, k and v: their copies,
    # else the bonus' r, k, v); the keys [alpha exp(-B); k exp(-B)] (2 T), rq and bq (or the copies matmul lays out
    # for the products with the keys: 2 T), the solution [U0, W] (2 T), exp(B_C - B) (T) and the carries exp(B_C)
    # (b H m N; kept with one chunk too); the masked [C, 2C] products of rq and bq with the keys (2 K each) and the
    # triangle I - L (K); the two bool masks ([C, 2C]); every chunk's u (T), the states before every chunk (m S);
    # with several chunks the ends (2 T) and [u; v] of every update but the last's (never read). Unpadded, the copies
    # of v for b_k @ v and r_k @ v (2 T, unless bmm reads v in place), and for rqc @ s in chunks 2..m copies of rq's
    # chunks (b > 1, many heads) or rq itself (b = 1)
    kernel = (3 * T + 2 * T + 3 * padded * T + 2 * T + 2 * T + 2 * T + T + b * H * m * N + 5 * K
              + 2 * (2 * C ** 2) / by + T + m * S + several * (2 * T + 2 * T * (m - 1) / m)
              + 2 * (1 - padded) * (1 - v_in_place) * T + rq_copies * T * (m - 1) / m + rq_viewed * T)
    # after it: the bonus' r, k, v, r r_k (4 tD) and its sum (tH); the GroupNorm's input (a view of the stacked
    # outputs, T, or its copy, tD), mean and rstd (2 tH); the gate's output, the norm's output plus the bonus, W_o's
    # input (3 tD)
    after = 4 * tD + tH + gn_view * T + (1 - gn_view) * tD + 2 * tH + 3 * tD
    return before + kernel + after


def _peak(b, H, N, m, C, by, T, tD, K, S, padded):
    """The inference forward's peak (elements), less its output (tD, which the cost pass counts apart). rwkv7.py holds
    to the kernel's end the shift's dx, the six x_*, r, v, the log decay, a, the gate's output, kh, k (its
    replacement: the first k is released), alpha and -kh (16 tD). chunked_dplr holds every local to its end: the
    padded copies of r, k, v, g, alpha, beta (6 T, padded), B, exp(B), exp(-B), exp(B_{i-1}) (4 T), the bool mask
    and the identity (C^2 bytes and elements), rq, bq, alpha exp(-B), k exp(-B) (4 T), the keys (2 T), the products
    rs and bs [C, 2C] and their masked copies (8 K), the right side [b_k v, bq] and the solution (4 T), out_v (T),
    exp(B_C - B) (T), the ends (2 T), the carries (b H m N). Then the moments: in the loop's last chunk, with every
    chunk's output (T) and its u (T / m): at the update's product endc @ [u; v] ([u; v], 2 T / m, and s, c s and the
    product, 3 S), or at its sum (the state after too: 4 S); after the loop, at the stack of the outputs (T) beside
    the state after (S). Where the [C, 2C] blocks lead (long chunks, narrow heads): at the triangular solve,
    before out_v and what follows it, beside the triangle I - b_a (K)."""
    t1 = T / m
    outside = 16 * tD
    base = (outside + 6 * padded * T + 4 * T + C ** 2 / by + C ** 2 + 4 * T + 2 * T + 8 * K + 4 * T + T + T + 2 * T
            + b * H * m * N)
    loop = base + T + t1
    at_product, at_sum, at_stack = loop + 2 * t1 + 3 * S, loop + 4 * S, loop + S + T
    at_solve = base - 4 * T - b * H * m * N + K  # before out_v, the tail, the ends, the carries: the triangle I - b_a
    return sp.Max(at_solve, at_product, at_sum, at_stack) - tD
