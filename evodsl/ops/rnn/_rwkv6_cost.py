"""The cost of rnn(rwkv6) (rwkv6.py), from the form that runs: the chunked vector-decay kernel of
attention/_chunked_linear.py on H heads of N channels (its FLOPs from _recurrent_cost.decay_kernel_flops), the
projections and LoRAs around it. t = b n tokens; R, D the LoRA ranks.

FLOPs in matmuls: W_r, W_k, W_v, W_g, W_o (2 t d^2 each); the mixes' LoRA, t d 5R and its five [R, d] maps; the
decay's, t d D and t D d; the kernel. Other FLOPs (a convention): ~30 t d for the shift, the six lerps, tanh, exp,
silu, the bonus and the GroupNorm; backward twice that.
Memory (elements; tD = t d, P = b (m T' - n) d the last chunk's padding, K = b H m T'^2 the chunks' [T', T'] blocks,
Z = b H m N^2 the states before every chunk): fitted to the storage tracker at 14 sizes (b 1..3, n 20..72, d
32..128, T 7..64, N 4..64, R 2..32, D 4..64; saved within 4 %, the inference peak within 9 %). Kept: ~28 tD (the
shift's difference, the lerps' inputs and factors, the five maps' inputs, exp's and silu's outputs, the kernel's
chunked q, k, v, log decay and their decayed copies, the bonus, the GroupNorm's input and output, W_o's input), 6 P,
K (the masked scores), 2 Z (the states and the carries), the mixes' tanh 5 t R, the decay's t D, 3 b m T' d with
several chunks (the decays into the state), 9 t H (the norm's statistics, the bonus' sums). Inference peak: ~22 tD +
27 P + 1.5 K + 2.5 Z + one state + 6 t R + t D / 2. Backward's peak: the input's gradient and one more, 2 tD; or
the blocks' gradients (K - tD / 4) or the stacked states' (Z - tD) when those lead. The last two are fitted at a
few sizes and miss by 20-40 % where one head holds the whole width (Z + tD measured) or at b = 2 with many heads
(K - 1.4 tD): not modelled.
"""
from __future__ import annotations

import sympy as sp

from ..attention._recurrent_cost import chunk_symbols, decay_kernel_flops
from ..cost import Cost, Symbols, linear
from ..registry import OpEnv


def rwkv6_cost(p, env: OpEnv, s: Symbols) -> Cost:
    b, n, by, d = s.b, s.n, s.bytes, s.d
    N = s.sym("N", p.head_size)
    H = d / N
    R, D = s.sym("R", p.mix_rank), s.sym("D", p.decay_rank)
    C, m, rows, several, padded = chunk_symbols(p, s)
    kf, kb = decay_kernel_flops(b, H, rows, C, N, N, several)
    t = b * n
    lin = linear(s, d, d, False)
    projs = lin + lin + lin + lin + lin + linear(s, d, 5 * R, False) + linear(s, 5 * R, d, False) \
        + linear(s, d, D, False) + linear(s, D, d, False)
    params = 5 * d * d + 5 * R * d * 2 + 2 * D * d + 6 * d + d + d + 2 * d  # the maps, six mixes, w0, u, GroupNorm
    other = 30 * t * d
    tD, P, K, Z = t * d, b * (rows - n) * d, b * H * m * C ** 2, b * H * m * N ** 2
    saved = 28 * tD + 6 * P + K + 2 * Z + 5 * t * R + t * D + 3 * several * b * rows * d + 9 * t * H
    peak = 22 * tD + 27 * P + sp.Rational(3, 2) * K + sp.Rational(5, 2) * Z + b * H * N ** 2 + 6 * t * R + t * D / 2
    return Cost(params=params, fwd=projs.fwd + kf, bwd=projs.bwd + kb, fwd_other=other, bwd_other=2 * other,
                saves_input=False, saved=saved * by, peak=peak * by, bwd_peak=sp.Max(2 * tD, K - tD / 4, Z - tD) * by,
                cache=b * (d + H * N ** 2) * by)
