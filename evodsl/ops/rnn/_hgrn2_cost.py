"""The cost of rnn(hgrn2) (hgrn2.py): its projections, then the vector-decay chunked kernel (_chunked_linear.py)
that torch runs at a known n; the export's one-piece form (a symbolic n) is not costed (tests/test_onnx.py
OTHER_FORMS). Symbols: H heads, e = expand (key width), v = d / H (value width), C = min(chunk, n), m = ceil(n / C),
N = m C (the last chunk zero-padded).
"""
from __future__ import annotations

import sympy as sp

from ..attention._recurrent_cost import chunk_symbols, decay_kernel_flops
from ..cost import Cost, Symbols, linear
from ..registry import OpEnv


def hgrn2_cost(p, env: OpEnv, s: Symbols) -> Cost:
    from .hgrn2 import heads_of

    d = env.d
    H, e = heads_of(p, d), p.expand
    dv = d // H
    b, n, by = s.b, s.n, s.bytes
    C, m, N, several, padded = chunk_symbols(p, s)
    fwd, bwd = decay_kernel_flops(b, H, N, C, e, dv, several)
    total = (linear(s, d, H * e, False) + linear(s, d, H * e, False) + linear(s, d, d, False)
             + linear(s, d, d, False))
    core = Cost(params=d, fwd=fwd, bwd=bwd)  # the norm's scale
    tk, tv = b * n * H * e * by, b * n * d * by  # a key-width and a value-width tensor
    Tk, Tv = b * N * H * e * by, b * N * d * by
    R, state = b * H * m * C ** 2 * by, b * H * e * dv * by
    # kept: silu's input, logsigmoid's input and buffer (with a lower bound: sigmoid's output, log's input), expm1's
    # output; the kernel's chunked q and k, exp(B), exp(-B), the decayed queries and keys (the matmul's copies),
    # exp(B_C - B), the carries, the chunked v, the scores and their mask, the stacked states; with several chunks the
    # decayed keys into the states (transposed: a copy) and the states the carries multiply; the output side: the
    # heads token-major, the rms, the normed heads and o_proj's input
    saved = (4 * tk + 7 * Tk + C ** 2 + b * H * m * e * by + Tv + R + m * state
             + several * (Tk + (m - 1) * state) + 3 * tv + b * n * by)
    saved += several * (1 - padded) * tk  # unpadded, the decayed queries keep q's head-strided layout: the matmul's copy
    # the inference peak, in the kernel's last line: q, k, the log decay and v (with their padded copies), B, the
    # decayed queries and keys, the keys decayed into the states, the scores, the chunks' states, the states before
    # every chunk and the last, the carries, the mask; then the first product beside the states' stack, or the
    # two products and their sum (the stack released); less the output
    base = 3 * tk + tv + padded * (3 * Tk + Tv) + 4 * Tk + R + (2 * m + 1) * state + b * H * m * e * by + C ** 2
    peak = base + sp.Max(m * state + Tv, 3 * Tv) - tv
    # the backward's peak: the output side's three gradients (the rms's released), or at the kernel's last line the
    # padded output's gradient, v's through the scores, the stacked states' (several chunks) and the decayed
    # queries', once the output side's saved tensors are released
    bwd_peak = sp.Max(3 * tv, 2 * Tv + several * m * state + Tk - 3 * tv) - b * n * by
    return Cost(params=total.params + core.params, fwd=total.fwd + core.fwd, bwd=total.bwd + core.bwd,
                saved=saved, saves_input=True, peak=peak, bwd_peak=bwd_peak, cache=state)
