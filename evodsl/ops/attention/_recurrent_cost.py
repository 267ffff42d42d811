"""The cost of the chunked linear recurrences (retention.py, gla.py, deltanet.py, gated_deltanet.py): their
projections, then the chunked kernel that torch runs at a known n (_chunked_linear.py, _chunked_delta.py; the
export's one-piece form, a symbolic n, is not costed: tests/test_onnx.py OTHER_FORMS).

Symbols beside attention's (_common.py): C = min(chunk, n) tokens a chunk, m = ceil(n / C) chunks, N = m C rows (the
last chunk zero-padded); in bytes, t = b h n dh (a head tensor), T = b h N dh (its chunked copy: T = t unpadded),
R = b h m C^2 (the [C, C] blocks of every chunk), Z = b h m dh^2 (one state before every chunk), u = b n h dh (the
output's heads, token-major).
"""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from ._common import head_symbols, projections_cost


def chunk_symbols(p, s: Symbols):
    """C, m, N, and several (1 when there is more than one chunk) and padded (1 when the last chunk is padded)."""
    C = sp.Min(p.chunk, s.n)
    m = sp.ceiling(s.n / C)
    return C, m, m * C, sp.Min(1, m - 1), sp.Min(1, m * C - s.n)


def decay_kernel_flops(b, h, N, C, dk, dv, several):
    """chunked_decay: per chunk the scores q k^T [C, C] and their product with V, the chunk's state K^T V and the
    queries against the state before it. Backward, twice each; with one chunk the state before is zero (no
    gradient) and the chunk's own state is not read: only the queries' gradient against the zero state."""
    fwd = 2 * b * h * N * C * (dk + dv) + 4 * b * h * N * dk * dv
    bwd = 4 * b * h * N * C * (dk + dv) + 2 * b * h * N * dk * dv + 6 * b * h * N * dk * dv * several
    return fwd, bwd


def retention_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """Kept (scalar decay): the rotation's cos and sin (q, k), the chunked q, k, v (padded copies, else the
    heads themselves), the decay ratios [C, C] and the scores, the queries and keys scaled by their decay and
    the decays, the states before every chunk; then the GroupNorm's input and statistics, the gate's input and
    swish, the normed heads, o_proj's input. With one chunk the chunk's own state and the queries against the zero
    state keep nothing. The inference peak is at the sum of the two products: q, k, v, their chunked copies, the
    ratios, the scores, the scaled q and k, the products and their sum, the chunks' states, the states before
    each chunk and the last. The backward's: the gradient of the gated output beside the input's, or the scores'
    gradient once the output side has released what it kept. Values are f = v_factor times as wide as a head's
    queries (dv = f dh): v, the outputs and what follows them are f head tensors wide."""
    h, kv, dh = head_symbols(p, s)
    f = p.v_factor
    dv = f * dh
    b, by, w = s.b, s.bytes, s.bytes
    C, m, N, several, padded = chunk_symbols(p, s)
    fwd, bwd = decay_kernel_flops(b, h, N, C, dh, dv, several)
    total = (linear(s, s.d, h * dh, p.bias) + linear(s, s.d, kv * dh, p.bias) + linear(s, s.d, kv * dv, p.bias)
             + linear(s, h * dv, s.d, p.bias) + linear(s, s.d, h * dv, p.bias))
    core = Cost(params=2 * h * dv, fwd=fwd, bwd=bwd)  # GroupNorm's scale and shift
    t, T, R = b * h * s.n * dh * by, b * h * N * dh * by, b * h * m * C ** 2 * by
    Z = b * h * m * dh * dv * by
    chunked = t + padded * (T - t)  # a chunked q, k or v: the padded copy, else the tensor itself
    rotation = 2 * s.n * dh * w if p.rotate else 0
    stats = 2 * b * s.n * h * w  # GroupNorm's mean and rstd
    # the stacked states and B's exp are kept always; with several chunks also the decayed keys (into the states),
    # the decayed queries (against a state with a gradient), (B_C - B)'s exp and the carries
    # v (transposed heads) is copied into its chunks whenever there are several, padded or not; the gated output's
    # value-wide tensors beyond the first head tensor's width: 2 (f - 1) t
    saved = (rotation + (2 + f) * chunked + 2 * R + Z + b * h * N * w + several * (2 * T + b * h * N * w + b * h * m * w)
             + several * (1 - padded) * f * t + (2 + 3 * f) * t + 2 * (f - 1) * t + stats)
    state = b * h * dh * dv * by
    peak = (2 + f) * t + padded * (2 + f) * T + 2 * R + (2 + 3 * f) * T + (2 * m + 1) * state + C ** 2 + 2 * b * h * N * w
    out = b * s.n * s.d * by
    # the scores' gradient R once the output side has released what it kept: the value-wide chunked copies (f T) and
    # their products' gradients (f T) beside q's chunked copy (T)
    bwd_peak = sp.Max(2 * f * t, t - (1 + 2 * f) * T + out - stats + R)
    return replace(total + core, saved=saved, peak=peak - out, cache=state, bwd_peak=bwd_peak, saves_input=True)


def gla_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """The vector-decay kernel (chunked_decay with a log decay per key channel); the gate's low-rank projection,
    the output gate's."""
    h, kv, dh = head_symbols(p, s)
    b, by = s.b, s.bytes
    C, m, N, several, padded = chunk_symbols(p, s)
    fwd, bwd = decay_kernel_flops(b, h, N, C, dh, dh, several)
    total = (projections_cost(p, s, h, kv, dh) + linear(s, s.d, h * dh, p.bias) + linear(s, s.d, p.rank, False)
             + linear(s, p.rank, h * dh, True))
    core = Cost(params=dh, fwd=fwd, bwd=bwd)  # the norm's scale
    t, T, R = b * h * s.n * dh * by, b * h * N * dh * by, b * h * m * C ** 2 * by
    state, chunked = b * h * dh ** 2 * by, t + padded * (T - t)
    # kept: the gate's low-rank activation, logsigmoid's input and buffer; the chunked q, k, v, exp(B), exp(-B),
    # the decayed queries and keys (transposed: a copy), the scores and their mask, the stacked states; with several
    # chunks exp(B_C - B), the carries, the decayed keys into the states (transposed: a copy) and the states the
    # carries multiply; the output side: the kernel's output, its rms, the normed heads, their token-major copy,
    # the gate's input and swish, o_proj's input
    saved = (b * s.n * p.rank * by + 2 * t + 3 * chunked + 4 * T + R + C ** 2 + m * state
             + several * (2 * T + b * h * m * dh * by + (m - 1) * state) + T + 5 * t + b * h * s.n * by)
    saved += (1 - padded) * t  # unpadded, the decayed queries keep q's head-strided layout: the matmul's copy
    # the inference peak, at the last product: q, k, v and the log decay (with their padded copies), B, the decayed
    # queries and keys, exp(B_C - B) and the keys decayed by it, the products, the scores, the chunks' states and
    # the states before every chunk and the last; the backward's: two gradients of the heads, or the input's
    # gradient beside the normed heads' (the rms released)
    out = b * s.n * s.d * by
    peak = (4 * t + padded * 4 * T + 6 * T + R + 2 * m * state + (m + 1) * state + b * h * m * dh * by + C ** 2)
    bwd_peak = sp.Max(2 * t, out + t - b * h * s.n * by)
    return replace(total + core, saved=saved, peak=peak - out, cache=b * h * dh ** 2 * by, bwd_peak=bwd_peak,
                   saves_input=True)


def delta_kernel_flops(b, h, N, C, dk, dv):
    """chunked_delta: per chunk K K^T and Q K^T, the triangular solve for [V, K] (C^2 (dv + dk) multiply-adds, which
    torch's counter does not count: no matmul), in the loop W S, Q S, the scores against U, K^T U. Backward: each
    twice, but the first chunk's W S and Q S (a zero state: no gradient) and the last chunk's K^T U (the state after
    it is not read); the solve's gradient for the triangle, -grad [U, W] [U, W]^T (its solve uncounted)."""
    fwd = 4 * b * h * N * C * dk + 2 * b * h * N * C * dv + 6 * b * h * N * dk * dv
    bwd = (8 * b * h * N * C * dk + 4 * b * h * N * C * dv + 2 * b * h * N * C * (dk + dv)
           + 2 * (4 * b * h * N * dk * dv - 2 * b * h * C * dk * dv) + 4 * b * h * (N - C) * dk * dv)
    return fwd, bwd


def _delta_cost(p, env: OpEnv, s: Symbols, gated: bool) -> Cost:
    h, kv, dh = head_symbols(p, s)
    b, by = s.b, s.bytes
    C, m, N, several, padded = chunk_symbols(p, s)
    fwd, bwd = delta_kernel_flops(b, h, N, C, dh, dh)
    total = projections_cost(p, s, h, kv, dh) + linear(s, s.d, h, p.bias)
    if gated:
        total = total + linear(s, s.d, h * dh, p.bias) + linear(s, s.d, h, False)
    params = dh + (h + 2 * kv) * dh * p.conv + (2 * h if gated else 0)  # the norm, the convolutions, A_log, dt_bias
    core = Cost(params=params, fwd=fwd, bwd=bwd)
    cache = b * h * dh ** 2 * by + (b * (p.conv - 1) * (h + 2 * kv) * dh * by if p.conv else 0)
    n = s.n
    t, T, R = b * h * n * dh * by, b * h * N * dh * by, b * h * m * C ** 2 * by
    state, chunked = b * h * dh ** 2 * by, t + padded * (T - t)
    width = (h + 2 * kv) * dh  # q, k, v side by side
    # the layer: the convolutions' zero-padded inputs and SiLU's inputs (no convolutions: SiLU's on the projections),
    # the L2 norms' inputs, norms and clamped norms, beta; the output side: the kernel's output, its rms, the normed
    # heads and their token-major copy (Gated DeltaNet: and the gate's input, swish and the product)
    layer = ((b * (n + p.conv - 1) * width * by if p.conv else 0) + b * n * width * by
             + b * n * (h + kv) * dh * by + 2 * b * n * (h + kv) * by + b * n * h * by
             + T + b * h * n * by + 2 * t + (3 * t if gated else 0))
    # the kernel: the chunked q, k, v (and beta, padded), K K^T, the masks, the triangle and the solution [U0, W], the
    # scores, the states before every chunk and every chunk's U; gated, the decay ratios, K K^T before and after
    # them, exp(B), exp(B_C - B), the decayed keys (twice: exp(B) into W, exp(B_C - B) into the state), the decayed
    # queries (with one chunk neither of the last two: the state before is zero, the one after unread), the carries,
    # and the gate's softplus input and output
    kernel = (3 * chunked + padded * b * h * N * by + 3 * R + 2 * C ** 2 + b * h * N * 2 * dh * by + m * state + T)
    if gated:
        kernel += 3 * R + 2 * b * h * N * by + (1 + 2 * several) * T + b * h * m * by + 2 * b * n * h * by + 2 * h * by
    # the inference peak: q, k, v (padded copies, beta's) with the kernel's blocks, the Max of three moments: the
    # scores masked (K K^T, the triangle, the scores before and after the mask, [V K] and its solution), the last
    # chunk's sum in the loop (the outputs so far, U, its two products and their sum, the states) and the stack of
    # the outputs (one chunk's U)
    W2, S1, eye = b * h * N * 2 * dh * by, state, C ** 2 * by + C ** 2
    base = 3 * t + padded * (3 * T + b * h * N * by) + 2 * W2 + eye + b * n * h * by
    extra = (R + 3 * b * h * N * by + 2 * T) if gated else 0  # the ratios; B, exp(B), exp(B_C - B); the decayed q, k
    phases = [base + 4 * R + extra, base + 3 * R + extra + T - T / m + 4 * T / m + S1 * m,
              base + 3 * R + extra + T + (m + 1) * S1 + T / m]
    out = b * n * s.d * by
    # the backward's peak, derived from the code path (each term names its tensors): the output side's gradients
    # (DeltaNet: three of the heads' width, beta's released; Gated DeltaNet: o_proj's input's, then the gate's and the
    # heads'), or, after the loop's backward, one moment in the kernel. Released by then: o_norm's input (the kernel's
    # output, T), its rsqrt and output and o_proj's input (gated: the heads' copy, the gate's input and swish and
    # their product), every chunk's U (T in all), the states before each chunk and the masked scores (R)
    c, rowN, row = b * n * h * by, b * h * N * by, b * h * n * by
    terms = []
    first = 2 * t if gated else 3 * t - c
    if gated:
        # at the scores' decay (qk * ratio): the input's gradient (g_proj's, summed into: out), the stacked gradients
        # of U0 and W (T each) and of the scores (R), qs's mul backward (the gradient of q, T, and of exp(B), summed
        # over channels: rowN), with several chunks kc's (of k and exp(B_C - B)) and the carries' (B's, rowN), then
        # grad * ratio and grad * scores (2 R). Released also, with several chunks, qs and kc and the carries' exp
        # (one chunk: qs is not kept against the zero state, and kc's product, the unread state after, never runs)
        grads = out + 3 * R + (3 + several) * T + (1 + 2 * several) * rowN
        released = (5 * t + row + T) + T + R + (1 + several * (m - 1)) * state + several * (2 * T + b * h * m * by)
    else:
        # in the solve's backward: the gradients of q and k (the loop's and q k^T's, summed: T each), of the solution
        # [U0 W] (2 T) and of the right side (2 T), the triangle's -grad [U0 W]^T (R) and its negation (R). Released
        # also the causal mask (C^2 bytes) and q's chunked copy
        grads = 6 * T + 2 * R
        released = (2 * t + row + T) + T + R + m * state + C ** 2 + chunked
        # or, with several chunks, in the loop's backward at the first chunk's scores (qkc @ u, the last product it
        # meets): o's gradient (T) beside the chunks' gradients, held until they are stacked: the scores' (R / m) of
        # every chunk; of q and W (T / m) of all but the first (not yet reached), of k of all but the last (whose
        # state after is not read), of U of every chunk, the first's in its two parts (from its update and its
        # scores): 4 m - 2 of T / m; at b > 1 a bmm's copy of one more (seen at the storage tracker). Released by
        # then: the output side's, and every chunk's U and state before but the first's
        head_grads = (4 * m - 2 + sp.Min(1, b - 1)) * T / m
        in_loop = several * (T + R + head_grads - (2 * t + row + T) - (m - 1) * (T / m + state))
        terms.append(in_loop)
    terms = [first, grads - released, *terms]
    bwd_peak = sp.Max(*terms)
    return replace(total + core, saved=layer + kernel, peak=sp.Max(*phases) - out, cache=cache, bwd_peak=bwd_peak,
                   saves_input=True)


def delta_cost(p, env: OpEnv, s: Symbols) -> Cost:
    return _delta_cost(p, env, s, gated=False)


def gated_delta_cost(p, env: OpEnv, s: Symbols) -> Cost:
    return _delta_cost(p, env, s, gated=True)
