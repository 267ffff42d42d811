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
27 P + 1.5 K + 2.5 Z + one state + 6 t R + t D / 2. The backward's peak is derived from the code path, each term
below naming its tensors: exact at the storage tracker in 23 builds (b 1..3, n 20..72, d 32..128, T 5..64, N 4..64;
one head and many, one chunk, several, a padded last one).
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
    T, tH = b * rows * d, t * H  # a chunked head tensor (padded: the last chunk's zero rows); a number a token and head
    # the output side's saved tensors, released before the kernel's backward starts: W_o's input (o g), silu's output,
    # the GroupNorm's output and input (o + the bonus), its mean and rstd, the bonus' sum (2 tH + tH), r u and r; and
    # v where the kernel holds another storage: its padded copy, or (unpadded: its chunks are a view of it) the copies
    # matmul lays out for bmm, unless the batch dimensions merge (one head; or b = 1 in one chunk) and bmm reads v
    in_place = 1 - sp.Min(1, H - 1) * (1 - (1 - several) * (1 - sp.Min(1, b - 1)))
    copied = (1 - padded) * (1 - in_place)  # a @ v and kc^T @ v each keep their own copy of v (T)
    released = 6 * tD + 3 * tH + (1 - (1 - padded) * in_place) * tD + padded * tD  # padded: k too (its copy kept)
    held = 4 * tD  # grad g (silu's branch runs after the kernel's) and the bonus' gradients of r, k, v (summed later)
    # at the output's backward: W_o's input's gradient, then o g's two (W_o's input released): 2 tD. In the kernel
    # (o = qd @ stack(before) + a @ v; each backward also holds o's gradient, a padded T): at a @ v's, the gradients
    # of a (K) and of v (T); then, with several chunks (one: the stack is a zero state, no gradient), at qd @ the
    # stacked states', the stack's (Z) and qd's (T) once a (K) and a @ v's copy of v are released
    at_av = held + 2 * T + K - released
    at_states = held + 3 * T + several * Z - released - copied * T
    bwd_peak = sp.Max(2 * tD, at_av, at_states)
    return Cost(params=params, fwd=projs.fwd + kf, bwd=projs.bwd + kb, fwd_other=other, bwd_other=2 * other,
                saves_input=False, saved=saved * by, peak=peak * by, bwd_peak=bwd_peak * by,
                cache=b * (d + H * N ** 2) * by)
