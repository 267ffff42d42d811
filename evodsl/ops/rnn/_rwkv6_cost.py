"""The cost of rnn(rwkv6) (rwkv6.py), from the form that runs: the chunked vector-decay kernel of
attention/_chunked_linear.py on H heads of N channels (its FLOPs from _recurrent_cost.decay_kernel_flops), the
projections and LoRAs around it. t = b n tokens; R, D the LoRA ranks.

FLOPs in matmuls: W_r, W_k, W_v, W_g, W_o (2 t d^2 each); the mixes' LoRA, t d 5R and its five [R, d] maps; the
decay's, t d D and t D d; the kernel. Other FLOPs (a convention): ~30 t d for the shift, the six lerps, tanh, exp,
silu, the bonus and the GroupNorm; backward twice that.
Memory (elements; tD = t d, T = b m T' d a chunked head tensor, its padding included, K = b H m T'^2 the chunks'
[T', T'] blocks, Z = b H m N^2 the states before every chunk, S = b H N^2 one state, tH = t H): saved and the
inference peak are derived from the code path, each term naming its tensor (_saved_outside, the kernel's below,
_peak): exact at the saved-tensor hooks and the storage tracker in 20 builds (b 1..3, n 20..72, d 32..128, T 5..64,
N 4..96; one head and many, one chunk, several, a padded last one, the scores leading the peak). The backward's
peak is derived likewise, each term below naming its tensors: exact at the storage tracker in 23 builds (b 1..3,
n 20..72, d 32..128, T 5..64, N 4..64; one head and many, one chunk, several, a padded last one).
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
    tD, K, Z = t * d, b * H * m * C ** 2, b * H * m * N ** 2
    T, tH = b * rows * d, t * H  # a chunked head tensor (padded: the last chunk's zero rows); a number a token, head
    S, mask = b * H * N ** 2, C ** 2 / by  # one state; the kernel's [T', T'] bool mask (one byte an entry)
    many_heads, batched, one = sp.Min(1, H - 1), sp.Min(1, b - 1), 1 - several
    # v's chunks are a view of v (unpadded); matmul copies them for bmm unless the batch dimensions merge (one head;
    # or b = 1 in one chunk)
    in_place = 1 - many_heads * (1 - one * (1 - batched))
    copied = (1 - padded) * (1 - in_place)  # a @ v and kc^T @ v each keep their own copy of v (T)
    # the kernel keeps (chunked_decay): exp(B), q (F.pad's copy of r, or its padded copy), exp(-B), k exp(-B) and
    # q exp(B) (the scores' factors), exp(B_C - B), k exp(B_C - B) (7 T; the last not with one chunk: the only
    # update is never read, its saved tensors freed, but for exp's results, which exp's own node keeps); padded,
    # the copies of k and v (2 T; else they are the bonus' k and v); matmul's copies of v (a @ v's, and kc^T @ v's
    # with several chunks); the masked scores (K), the stacked states (Z), the states read by an update that is read
    # (the zeros and those after chunks 1..m - 2: (m - 1) S), the carries exp(B_C) (b H m N) and the bool mask
    kernel = (7 - one) * T + 2 * padded * T + copied * (1 + several) * T + K + Z + (m - 1) * S + b * H * m * N + mask
    saved = _saved_outside(tD, tH, t * R, t * D) + kernel
    peak = _peak(tD, t * R, T, K, Z, S, m, b * H * m * N, mask, padded, copied)
    # the output side's saved tensors, released before the kernel's backward starts: W_o's input (o g), silu's output,
    # the GroupNorm's output and input (o + the bonus), its mean and rstd, the bonus' sum (2 tH + tH), r u and r; and
    # v where the kernel holds another storage (its padded copy, or matmul's copies)
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


def _saved_outside(tD, tH, tR, tDr):
    """What rwkv6.py keeps for backward around the kernel (elements), each tensor named: before it, the shift's
    difference dx, the mixes' LoRA input (x + dx mu_x) and its tanh [t, 5 R], the five factors mu_* + m_*, the inputs
    of W_r, W_k, W_v, W_g and the decay's LoRA (x_r, x_k, x_v, x_g, x_w), its tanh [t, D], W_g's output (silu's
    input), exp's output and its negation (the clamp's input): 15 tD + 5 t R + t D; after it, the bonus' r, k, v, r u
    and its sum (tH), the GroupNorm's input, mean and rstd (2 tH), its output and silu's (the product's two factors)
    and W_o's input: 8 tD + 3 tH."""
    before = tD + tD + 5 * tR + 5 * tD + 5 * tD + tDr + tD + tD + tD
    after = 4 * tD + tH + tD + 2 * tH + 2 * tD + tD
    return before + after


def _peak(tD, tR, T, K, Z, S, m, carries, mask, padded, copied):
    """The inference forward's peak (elements), less its output (tD, which the cost pass counts apart): rwkv6.py holds
    every local until it returns: the shift's dx, the mixes' tanh [t, 5 R] and their LoRA output m_* (5 tD), the five
    x_*, r, k, v, silu(g), the clamped log decay and q = F.pad(r) (17 tD + 5 t R). In chunked_decay, all alive to its
    end: the padded copies of q, k, v and the log decay (4 T, padded), B, q exp(B), k exp(-B), k exp(B_C - B) (4 T),
    the bool mask, the masked scores (K), the carries exp(B_C), the chunks' states (Z) and the states before every
    chunk and after the last ((m + 1) S). Then the moments: at qd @ stack(before), the stack (Z) and the product (T);
    at a @ v, that product, matmul's copy of v (copied) and a @ v (2 T); at their sum, three T. Earlier, at the
    scores: the bmm's output and its masked copy (2 K), before kc and the states."""
    outside = tD + 5 * tR + 5 * tD + 5 * tD + 3 * tD + tD + tD + tD
    scores = outside + 4 * padded * T + 3 * T + mask
    base = scores + T + K + carries + Z + (m + 1) * S
    at_stack, at_av, at_sum = base + Z + T, base + (2 + copied) * T, base + 3 * T
    return sp.Max(scores + 2 * K, at_stack, at_av, at_sum) - tD
