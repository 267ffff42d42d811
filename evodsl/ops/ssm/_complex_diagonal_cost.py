"""The cost of ssm(lru) and ssm(s5) (_complex_diagonal.py), from the form that runs: t = b n tokens, N complex
states, d the width, T = chunk, T' = min(T, n), L = ceil(log2 T) doubling levels.

FLOPs in matmuls: Bbar u (2 t d 2N), Re(C x) (two, 2 t N d each); backward twice. Other FLOPs (a convention): the
scan's complex multiply-adds, 14 a state a level (H += A H, A *= A) and 8 for the carry; D u, 2 t d; the
decay and Bbar from the parameters, 8 N d; backward twice.
Kept for backward: the states' two parts (2 t N), the matmul's [2N, d] weight [Bbar_re; Bbar_im], and `small`
[N] vectors (the decay and discretisation pieces: lru 8, s5 25), besides the input (u, read by Bbar u and D u).
Inference peak (less the output, which the measure leaves out): inside the scan, Bbar u (2 t N reals), its
complex copy and the complex states (4 t N), a chunk's decays and one level's product (2 b T' N complex); or at
the readout, the states' parts and the second [t, d] product; or Bbar's pieces and [Bbar_re; Bbar_im] (4 N d).
Backward's peak (read off the storage tracker): in the reverse scan, D's gradient (t d), the states' gradients
(2 t N), their complex copy and the scan's output (4 t N) and a chunk's buffers (4 b T' N); or at the end, three
[t, d] gradients less the states and Bbar released by then; or at the start, two [t, d] and one [t, N].
Decoding: the complex state, 2 b N reals, whatever n.
"""
from __future__ import annotations

import sympy as sp

from ..cost import Cost
from ..registry import OpEnv
from ..rnn._diag_scan import levels


def complex_diagonal_cost(p, env: OpEnv, s, N_field: str = "N", small: int = 8) -> Cost:
    d, b, n, by = s.d, s.b, s.n, s.bytes
    N, T = s.sym("N", getattr(p, N_field)), s.sym("T", p.chunk)
    L = len(levels(p.chunk))
    t = b * n
    Tn = sp.Min(T, n)
    other = t * N * (14 * L + 8) + 2 * t * d + 8 * N * d
    return Cost(params=3 * N + 4 * N * d + d, fwd=8 * t * N * d, bwd=16 * t * N * d, fwd_other=other, bwd_other=2 * other,
                saved=(2 * t * N + 2 * N * d + small * N) * by, saves_input=True,
                peak=sp.Max(6 * t * N + 4 * b * Tn * N - t * d, 2 * t * N + t * d, 4 * N * d - t * d) * by,
                bwd_peak=sp.Max(t * d + 6 * t * N + 4 * b * Tn * N, 3 * t * d - 2 * t * N - 2 * N * d, 2 * t * d + t * N) * by,
                cache=2 * b * N * by)
