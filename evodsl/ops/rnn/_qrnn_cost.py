"""The cost of rnn(qrnn) (qrnn.py), from the form that runs: t = b n tokens, d the width, k the window, T = chunk,
L = ceil(log2 T) doubling levels.

FLOPs in matmuls: the convolution Conv1d(d, 3 d, k), 6 t d^2 k forward, twice that backward (input and weight).
Other FLOPs (a convention): tanh and two sigmoids, 4 t d each; 1 - f, (1 - f) z and o c, t d each; the scan,
3 a state a level (H += A H, A *= A) and 2 for the carry; backward twice.
Kept for backward: the padded input [b, d, n + k - 1] (the convolution's), z, f, o, 1 - f and c (5 t d).
Inference peak (less the output): the convolution's [t, 3 d] output beside z, f and o (6 t d); the scan's
chunk buffers (2 b T' d, beside f, o, u and c) never exceed it.
Backward's peak (read off the storage tracker): 6 t d gradients and the reverse scan's [b, 1, d] zero decay.
Decoding: the last k - 1 inputs and c, b d k, whatever n.
"""
from __future__ import annotations

from ..cost import Cost
from ..registry import OpEnv
from ._diag_scan import levels


def qrnn_cost(p, env: OpEnv, s) -> Cost:
    d, b, n, by = s.d, s.b, s.n, s.bytes
    k = s.sym("k", p.window)
    L = len(levels(p.chunk))
    t = b * n
    conv = 6 * t * d * d * k
    other = 15 * t * d + t * d * (3 * L + 2)
    return Cost(params=3 * d * d * k + (3 * d if p.bias else 0), fwd=conv, bwd=2 * conv, fwd_other=other,
                bwd_other=2 * other + (3 * t * d if p.bias else 0),
                saved=(5 * t * d + b * d * (n + k - 1)) * by, peak=5 * t * d * by, bwd_peak=(6 * t * d + b * d) * by,
                cache=b * d * k * by)
