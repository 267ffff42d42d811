"""The cost of ssm(mamba) (mamba.py), from the form that runs (_mamba_scan.py): t = b n tokens, E = expand d, N the
state, R = dt_rank, k the kernel, T = chunk, L = ceil(log2 T) doubling levels, U = b n E N elements (one state per
token and channel).

FLOPs in matmuls: in_proj, x_proj, dt_proj, out_proj; y = h C (a batched matmul, 2 t E N); the depthwise
convolution, 2 t E k forward and as much for its input's gradient, and for its weight's gradient what FlopCounterMode
counts, 2 t E k * E (its formula ignores groups there, as in mha(skip_reuse)). Other FLOPs (a convention): the
scan's dt A, cumsum, dt x B and 4 per element a level (sub, exp, mul, add); ~12 t E for silu, softplus, D x and the
gate; backward twice that.
Kept for backward: the scan runs each chunk under activation checkpointing (_mamba_scan.py), so it keeps a chunk's
incoming carry [b, E, N] (none for the first: m - 1 of them, m = ceil(n / T)) and no inner state; beside it in_proj's
output (x, z), the padded convolution input, its output, x, x_proj's output, dt before and after softplus, dt x,
C h + D x, silu(z), out_proj's input, -exp(A_log) and exp(A_log). The backward recomputes every chunk's levels
(their elementwise work once more; not h C's matmul: checkpointing stops once the saved tensors are back).
Inference peak: a chunk's cumulative log-decays, its state and a level's two temporaries (4 U_T, T' = min(T, n))
beside in_proj's output, x, dt and the outputs so far; or the gate's end, 8 t E. Backward's peak (fitted to the
storage tracker at T 8..32, N 4..64, n 64..160, to 2.4%): one recomputed chunk's level states and decay factors with
their gradients, (2 L + 5/2) U_T, or the projections' gradients, 2 t E.
Decoding: the convolution's last k - 1 inputs and the state, b E (k - 1 + N), whatever n.
"""
from __future__ import annotations

import math

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from ..rnn._diag_scan import levels


def mamba_cost(p, env: OpEnv, s: Symbols) -> Cost:
    d = env.d
    b, n, by = s.b, s.n, s.bytes
    E = s.sym("E", p.expand * d)
    N, k, R = s.sym("N", p.N), s.sym("k", p.conv), s.sym("R", math.ceil(d / 16) if p.dt_rank == "auto" else p.dt_rank)
    T, L = s.sym("T", p.chunk), len(levels(p.chunk))
    t = b * n
    conv = 2 * t * E * k
    dwc = Cost(params=E * k + (E if p.conv_bias else 0), fwd=conv, bwd=conv + conv * E,
               bwd_other=t * E if p.conv_bias else 0)
    U = t * E * N
    levels_other = U * (3 + 4 * L)
    other = levels_other + 12 * t * E
    # A_log, D, dt bias; backward: the gradients, and the recomputed chunks' levels (the recomputation stops early,
    # once h is back: h C's matmul, whose output no backward reads, does not run again)
    scan = Cost(params=E * N + 2 * E, fwd=2 * U, bwd=4 * U, fwd_other=other, bwd_other=2 * other + levels_other)
    total = (linear(s, s.d, 2 * E, p.bias) + dwc + linear(s, E, R + 2 * N, False) + linear(s, R, E, False)
             + scan + linear(s, E, s.d, p.bias))
    tE = t * E * by
    carries = (sp.ceiling(n / T) - 1) * b * E * N * by  # the checkpointed chunks' incoming states
    saved = carries + 10 * tE + b * E * (n + k - 1) * by + t * (R + 2 * N) * by + 2 * E * N * by
    UT = b * sp.Min(T, n) * E * N * by
    xp = t * (R + 2 * N) * by
    peak = sp.Max(4 * UT + 5 * tE + xp, 6 * tE + xp)
    return Cost(params=total.params, fwd=total.fwd, bwd=total.bwd, fwd_other=total.fwd_other,
                bwd_other=total.bwd_other, saved=saved, saves_input=True, peak=peak,
                bwd_peak=sp.Max((2 * L + sp.Rational(5, 2)) * UT, 2 * tE), cache=b * E * (k - 1 + N) * by)
