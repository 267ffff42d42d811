"""The cost of mha(el) (el.py): the folded form that runs. The query projection, q W_K^T per head (a batched matmul
to width d), SDPA's fused kernel over [b, h, n, n] scores of width d against X (one shared K/V head: keys = values =
X, read in place), (A X) W_V^T + b_V per head (a batched matmul), o_proj. k_proj and v_proj never run as layers:
their weights are the batched matmuls' (repeated to the h query heads under grouped K/V heads)."""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from ._common import LSE_BYTES, head_symbols, projections_cost


def el_cost(p, env: OpEnv, s: Symbols) -> Cost:
    h, kv, dh = head_symbols(p, s)
    b, n, d, by = s.b, s.n, s.d, s.bytes
    params = projections_cost(p, s, h, kv, dh).params  # mha(softmax)'s four projections
    folded = Cost(fwd=2 * b * n * h * dh * d, bwd=4 * b * n * h * dh * d)  # q W_K^T, and (A X) W_V^T
    scores = b * h * n ** 2
    core = Cost(fwd=4 * scores * d, bwd=10 * scores * d, fwd_other=5 * scores, bwd_other=10 * scores)
    total = linear(s, d, h * dh, p.bias) + linear(s, h * dh, d, p.bias) + folded.scaled(2) + core
    q, qx, x = b * n * h * dh * by, b * n * h * d * by, b * n * d * by  # q (and o W_V^T), q' (and A X), X (the output)
    w = h * dh * d * by if kv != h else 0  # W_K, W_V repeated to the h query heads (grouped K/V heads): a copy each
    lse = LSE_BYTES * b * h * n
    # q (the first batched matmul's input), q' and A X (SDPA's), the logsumexp, o_proj's input (a copy), W_V repeated
    # (W_K's repeat is the first matmul's input too)
    saved = q + 2 * qx + lse + q + 2 * w
    phases = [q + qx + w,  # q W_K^T
              qx + qx + lse,  # SDPA: q' and its output A X
              qx + w + 2 * q + x]  # at o_proj: A X, W_V repeated, (A X) W_V^T and its copy, the output
    # backward: the gradients of A X (from the W_V matmul) and q' and the two of X (keys and values), o_proj's copy and
    # the repeated W_V released
    bwd = 2 * qx + 2 * x - q - w
    return replace(total, params=params, saved=saved, peak=sp.Max(*phases) - x, cache=b * n * d * by,
                   saves_input=True, saves_output=False, bwd_peak=bwd)
