"""The cost of rnn(mlstm) (mlstm.py, _mlstm_kernel.py)."""
from __future__ import annotations

import sympy as sp

from ..attention._recurrent_cost import chunk_symbols, decay_kernel_flops
from ..cost import Cost, Symbols, linear
from ..registry import OpEnv


def mlstm_cost(p, env: OpEnv, s: Symbols) -> Cost:
    d = env.d
    E, H = p.expand * d, p.heads
    dh = E // H
    b, n, by = s.b, s.n, s.bytes
    C, m, N, several, padded = chunk_symbols(p, s)
    t = b * n
    conv = 2 * t * E * p.conv
    dwc = Cost(params=E * p.conv + E, fwd_other=conv, bwd_other=2 * conv)  # k shifted multiply-adds, no matmul
    total = (linear(s, d, 2 * E, p.bias) + dwc + linear(s, E, E, False) + linear(s, E, E, False)
             + linear(s, E, E, False) + linear(s, 3 * E, H, True) + linear(s, 3 * E, H, True) + linear(s, E, d, p.bias))
    fwd, bwd = decay_kernel_flops(b, H, N, C, dh, dh, several)
    core = Cost(params=2 * E, fwd=fwd, bwd=bwd)
    cache = b * (E * (p.conv - 1) + H * dh * dh + H * dh + H) * by
    tE, T, R = t * E * by, b * H * N * dh * by, b * H * m * C ** 2 * by
    state, nstate, row = b * H * dh ** 2 * by, b * H * dh * by, b * H * N * by
    sig = 1 if p.forget == "sigmoid" else 0
    # kept by the layer: the convolution's padded input and output, q_proj's and k_proj's copies of x_c (token-major),
    # the up-projection's output (v_proj's input, swish(z)'s), [q; k; v], logsigmoid's input and buffer; the norm's
    # centred heads and rms, the normed heads token-major, x_c, the skip's sum, swish(z), their product
    rows = sp.Min(1, b - 1)  # q_proj's and k_proj's inputs: x_c [b, E, n] transposed, copied unless b = 1
    layer = b * E * (n + p.conv - 1) * by + (12 + 2 * rows) * tE + b * H * n * by * (1 + 2 * sig)
    # the kernel: the mask, the chunked q, k, v, the weights into the state and the weighted keys (transposed: a
    # copy), the states before every chunk and their normalisers, the carried states the loop multiplies (with
    # several chunks), q C' and the numerator, the scores before and after their weights and the weighted ones,
    # the carries, the denominator's pieces
    # (with one chunk 5 T, the weighted keys unread; unpadded, the heads' strided q, k, v copied for four matmuls)
    kernel = (C ** 2 + (5 + several * (1 + 4 * (1 - padded))) * T + 3 * R + 7 * row + m * state + b * H * m * dh * by
              + (m - 1) * (state + nstate))
    # the inference peak, at the numerator's sum: the up-projection's output, the convolution's padded input, x_c,
    # q, k, v, [q; k; v], the gates; in the kernel the zero state, the padded copies, B, the mask, log D, w, the
    # row maxima, the weighted keys, each chunk's own state and normaliser, the loop's states and their stacks, the
    # stabilisers, the carries, the scores and three [C, dh] products
    live = 9 * tE + b * E * (n + p.conv - 1) * by + b * n * H * by * (2 + sig)
    states = (3 * m + 1) * (state + nstate + b * H * by)
    # (or, where the [C, C] blocks lead, at the scores' weights: log D, q k^T, log D - m and its exp)
    peak = (live + states + padded * (3 * T + 2 * row) + 7 * row + C ** 2 + sp.Max(2 * R + 4 * T, 4 * R)
            - b * n * d * by)
    # the backward's peak: the gate's two gradients, or the norm's (three of E a token where b = 1: the layer's
    # copies not yet released), or in the kernel the stacked states' gradient beside q's (several chunks), or the
    # scores' (where the [C, C] blocks lead); fitted to the storage tracker at m 1..5, dh 8..128 within 6 %
    bwd_peak = sp.Max(2 * tE, (3 - rows) * tE - b * H * n * by, sp.Max(several * m * state, R) - T / 2 - rows * tE)
    return Cost(params=total.params + core.params, fwd=total.fwd + core.fwd, bwd=total.bwd + core.bwd,
                saved=layer + kernel, saves_input=True, peak=peak, bwd_peak=bwd_peak,
                cache=cache)
