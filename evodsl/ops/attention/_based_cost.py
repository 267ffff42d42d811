"""The cost of mha(based) (based.py): the window branch as mha(local) runs it (_banded.py's banded_attention_cost,
with the shared q, k, v and o projections), plus the linear branch: the feature projections, the Taylor map and the
chunked kernel of _chunked_linear.py (no decay: g = 0) on F = 1 + f + f^2 features against the values with a column
of ones (dv = dh + 1). Each memory term below names the tensor it counts, read off the code path of based.py,
_feature_linear.normalised and _chunked_linear.chunked_decay."""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from ._banded import band_layout, banded_attention_cost
from ._common import head_symbols
from ._recurrent_cost import chunk_symbols, decay_kernel_flops


def _window_layout(b, h, n, dh, by, w):
    """The window's form in training (banded_attention, causal): one SDPA call where n <= w, else _blocked_band's
    nb blocks of B queries against K keys. Returns (o_copy, Gq, Gk): o_copy is 1 where the window's output is not
    laid out as o_proj's input (banded_attention_cost's o_copy: blocks overrunning n, or b > 1), 0 where mha(local)
    would hand it to o_proj uncopied (based.py always copies: o_proj reads lin + win transposed); Gq, Gk the bytes of
    the blocked queries' and the padded keys' gradients."""
    B, nb, K, _ = band_layout(n, w - 1, 0, wide=True)
    o_copy = sp.Piecewise((0, n <= w), (sp.Min(1, (b - 1) + (nb * B - n)), True))
    return o_copy, b * h * nb * B * dh * by, b * h * nb * K * dh * by


def based_cost(p, env: OpEnv, s: Symbols) -> Cost:
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    f, w = s.sym("f", p.feature_dim), s.sym("w", p.window)
    F = 1 + f + f ** 2
    window = banded_attention_cost(p, env, s, lo=w - 1, hi=0, cache_keys=w)
    C, m, N, several, padded = chunk_symbols(p, s)
    fwd, bwd = decay_kernel_flops(b, h, N, C, F, dh + 1, several)
    lin = linear(s, s.d, h * f, p.bias) + linear(s, s.d, kv * f, p.bias) + Cost(fwd=fwd, bwd=bwd)

    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by  # a head tensor; k or v; the output
    grouped = 1 if kv != h else 0  # fk and v repeated to the h query heads (expand_kv: copies)
    t, T = b * h * n * F * by, b * h * N * F * by  # one feature tensor (Taylor's cat), its chunked (padded) copy
    V1, V1N = b * h * n * (dh + 1) * by, b * h * N * (dh + 1) * by  # [v 1] (normalised's pad), chunked
    R = b * h * m * C ** 2 * by  # a [C, C] block a chunk: the decay ratios, the scores a
    state = b * h * F * (dh + 1) * by  # one state [S z]
    row, rowN, per_chunk = b * h * n * by, b * h * N * by, b * h * m * by  # a number a token (g, B, den), a chunk
    proj_f = b * n * (h + kv) * f * by  # the feature projections' outputs
    o_copy, Gq, Gk = _window_layout(b, h, n, dh, by, w)
    window_saved = window.saved + (1 - o_copy) * q  # o_proj's input: always the copy of lin + win
    chunked = lambda full, padded_copy: full + padded * (padded_copy - full)  # noqa: E731 (_chunks: a view or a pad)

    # kept for backward: the projections' outputs (Taylor's outer product reads them), the chunked fq and fk (q @ k^T),
    # the chunked [v 1] (a @ v, the chunks' states), the decay ratios (a = scores * ratio) and a, exp(B) (qd); with
    # several chunks also qd, kc, exp(B_C - B) and exp(B_C) (the states are read: one chunk's is not), the stacked
    # states before each chunk (qd @ states), o (the division) and den + (den == 0)
    saved = (proj_f + 2 * chunked(t, T) + chunked(V1, V1N) + 2 * R + rowN
             + several * (2 * T + rowN + per_chunk) + m * state + V1N + row)

    # inference peak: in the chunked kernel, over q, k, v (and v repeated), fq, fk (at h heads), [v 1], g, the padded
    # copies, B and the causal mask: the scores q k^T beside the decay ratios and their product a; or at
    # o = qd @ states + a @ v, over the ratios, a, qd, kc, exp(B_C), the chunks' own states and the m + 1 states before
    # and after each chunk, the stacked states beside qd @ them, or the two products and their sum
    inputs = q + 2 * kvb + 2 * t + grouped * q + V1 + row + padded * (2 * T + V1N + rowN) + rowN + C ** 2
    scores = inputs + 3 * R
    kernel = inputs + 2 * R + 2 * T + per_chunk + (2 * m + 1) * state + sp.Max(m * state + V1N, 3 * V1N)
    # the window branch (its own peak over q, k, v) beside fq, fk and lin; o_proj over lin, win, their sum, its copy
    windowed = window.peak + out + 2 * t + q
    at_out = q + 2 * kvb + 2 * t + grouped * q + 4 * q + out
    peak = sp.Max(scores, kernel, windowed, at_out) - out

    # backward's peak: the window's, at its kernel's backward: o_proj's input's gradient beside that kernel's gradients
    # (of q, k and v at h heads: one call; of the blocked q, and of the padded k, v, after o's gradient laid out as the
    # blocked queries, a copy unless o_proj's input would have been the kernel's output), o_proj's copy released;
    # or the linear kernel's, beside the window's gradients of q, k and v (pending: their projections come later),
    # once all the window kept is released: at qd @ states, the gradients of o, of the chunked [v 1], of a, of the
    # states (several chunks) and of qd, a, o and den released; or at q @ k^T, the gradients of the chunked fq (from
    # qd and from the scores) and fk (from the scores, and from kc with several chunks), the scores' and the
    # chunked [v 1]'s, when all the kernel kept but fq and fk is released
    gv = q if grouped else kvb
    window_grads = q + kvb + gv
    kernel_kept = saved - proj_f - 2 * chunked(t, T)
    at_states = V1N + several * m * state + T + window_grads - row - window_saved
    at_features = (3 + several) * T + R + V1N + window_grads - window_saved - kernel_kept
    kept_kv = 2 * q if grouped else 2 * kvb  # the keys and values the window's SDPA call read (repeated or not)
    at_window = sp.Piecewise((q + kept_kv, n <= w), ((1 + o_copy) * Gq + 2 * Gk, True))
    bwd_peak = sp.Max(at_window, at_states, at_features)
    cache = b * h * F * (dh + 1) * by
    return replace(window + lin, saved=window_saved + saved, peak=peak, cache=window.cache + cache,
                   bwd_peak=bwd_peak, saves_input=True)
