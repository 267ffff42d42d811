"""The cost of ssm(mamba) (mamba.py), from the form that runs (_mamba_scan.py): t = b n tokens, E = expand d, N the
state, R = dt_rank, k the kernel, T = chunk, T' = min(T, n), U = b n E N elements (one state per token and channel),
U_T = b T' E N (a chunk's).

FLOPs in matmuls: in_proj, x_proj, dt_proj, out_proj; y = C h (a batched matmul, 2 t E N), and in backward dL/d(dt x)
= B g (as much); the depthwise convolution, 2 t E k forward and as much for its input's gradient, and for its
weight's gradient what FlopCounterMode counts, 2 t E k * E (its formula ignores groups there, as in
mha(skip_reuse)). Other FLOPs (a convention): the scan's dt A, exp, dt x B and the carry's multiply-add, 5 per
state, and its doubling, 3 per state a level (a product, a sum, the decays' product; L = ceil(log2 T') levels);
~12 t E for silu, softplus, D x and the gate. Backward: the chunk's recomputation (5 + 3 L per state), C dy, dC,
dB, a g, q, dA and q A (11 per state), the reverse recurrence's doubling (3 L), and twice the rest.
Kept for backward: the scan's Function keeps each later chunk's incoming state [b, E, N] (m - 1 of them, m = ceil(n /
T)) and no inner state; beside it in_proj's output (x, z), the padded convolution input, its output, x (made
token-major once: x_proj's input and the scan's), x_proj's output, dt before and after softplus, dt_proj's input
made contiguous, C h + D x, silu(z), out_proj's input, -exp(A_log) and exp(A_log).
Inference peak: the scan's four chunk buffers (decays, states, the doubling's products and its temporary: 4 U_T),
A and its transpose, a chunk's dt x, beside
in_proj's output, x, dt, y and x_proj's output; or the gate's end, 6 t E. Backward's peak: the scan's five chunk
buffers (decays, states, their gradients, the doubling's products, a temporary: 5 U_T) beside the gradients of B and C (2 t N), of A, A
transposed and its gradient (3 E N) and three of a chunk's [b, T', E] (dt x, B g, a result); the gradients of dt and
x (2 t E) are offset by in_proj's output and the gate's inputs, freed by then (the storage tracker, to 1%); or the
projections' gradients, 2 t E.
Decoding: the convolution's last k - 1 inputs and the state, b E (k - 1 + N), whatever n.
"""
from __future__ import annotations

import math

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv


def mamba_cost(p, env: OpEnv, s: Symbols) -> Cost:
    d = env.d
    b, n, by = s.b, s.n, s.bytes
    E = s.sym("E", p.expand * d)
    N, k, R = s.sym("N", p.N), s.sym("k", p.conv), s.sym("R", math.ceil(d / 16) if p.dt_rank == "auto" else p.dt_rank)
    T = s.sym("T", p.chunk)
    t = b * n
    conv = 2 * t * E * k
    dwc = Cost(params=E * k + (E if p.conv_bias else 0), fwd=conv, bwd=conv + conv * E,
               bwd_other=t * E if p.conv_bias else 0)
    U = t * E * N
    L = sp.ceiling(sp.log(sp.Min(T, n), 2))  # the doubling's levels in a chunk
    other = (5 + 3 * L) * U + 12 * t * E
    # A_log, D, dt bias; backward: the recomputed chunks ((5 + 3 L) U), the gradients' elementwise work (11 U), the
    # reverse recurrence's doubling (3 L U), the rest twice
    scan = Cost(params=E * N + 2 * E, fwd=2 * U, bwd=2 * U, fwd_other=other, bwd_other=(16 + 6 * L) * U + 24 * t * E)
    total = (linear(s, s.d, 2 * E, p.bias) + dwc + linear(s, E, R + 2 * N, False) + linear(s, R, E, False)
             + scan + linear(s, E, s.d, p.bias))
    tE = t * E * by
    carries = (sp.ceiling(n / T) - 1) * b * E * N * by  # each later chunk's incoming state
    saved = carries + 9 * tE + b * E * (n + k - 1) * by + t * (R + 2 * N) * by + 2 * E * N * by
    Tn = sp.Min(T, n)
    UT = b * Tn * E * N * by
    xp = t * (R + 2 * N) * by
    peak = sp.Max(4 * UT + 5 * tE + xp + 2 * E * N * by + b * Tn * E * by, 6 * tE + xp)
    return Cost(params=total.params, fwd=total.fwd, bwd=total.bwd, fwd_other=total.fwd_other,
                bwd_other=total.bwd_other, saved=saved, saves_input=True, peak=peak,
                bwd_peak=sp.Max(5 * UT + (2 * t * N + 3 * E * N + 3 * b * Tn * E) * by, 2 * tE), cache=b * E * (k - 1 + N) * by)
