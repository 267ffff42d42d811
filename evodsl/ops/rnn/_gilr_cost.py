"""The cost of rnn(gilr) (gilr.py), from the form that runs: t = b n tokens, d the width, T = chunk, T' = min(T, n),
L = ceil(log2 T) doubling levels.

FLOPs in matmuls: the projection Linear(d, 2 d), 4 t d^2; backward twice. Other FLOPs (a convention): sigmoid and
tanh, 4 t d each; 1 - g and (1 - g) z, t d each; the scan, 3 a state a level and 2 for the carry; backward twice.
Kept for backward: g, z and 1 - g (3 t d), besides the input (the projection's) and the output h (the scan's).
Inference peak (less the output): the projection's [t, 2 d] output beside g and z; or in the scan g, u and a
chunk's decays and one level's product (b (2 T' - 1) d).
Backward's peak (read off the storage tracker): 4 t d gradients and the reverse scan's [b, 1, d] zero decay.
Decoding: h, b d, whatever n.
The GILR-LSTM (lstm=true): Linear(d, 6 d) and U's Linear(d, 4 d) (no bias), 20 t d^2; other FLOPs: six sigmoids and
tanhs (4 t d each), 1 - g, (1 - g) j, i z, the in-place add and o c (t d each), two scans. Kept for backward (read
off the saved-tensor hooks): 10 t d (the activations g, j, f, i, o, z, the scans' h~ and c, h~ shifted, the products
(1 - g) j's and i z's factors), the input, not the output (o c's factors are kept). Inference peak: 11 t d (the gates'
[t, 4 d] beside h~, its shift, the activations and the scan's outputs).
Backward's peak: 6 t d and b d. Decoding: h~ and c, 2 b d.
"""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, linear
from ..registry import OpEnv
from ._diag_scan import levels


def gilr_cost(p, env: OpEnv, s) -> Cost:
    d, b, n, by = s.d, s.b, s.n, s.bytes
    T, L = s.sym("T", p.chunk), len(levels(p.chunk))
    t = b * n
    if p.lstm:
        proj = linear(s, d, 6 * d, p.bias) + linear(s, d, 4 * d, False)
        other = 29 * t * d + 2 * t * d * (3 * L + 2)
        return Cost(params=proj.params, fwd=proj.fwd, bwd=proj.bwd, fwd_other=other,
                    bwd_other=2 * other + proj.bwd_other, saved=10 * t * d * by, saves_input=True, saves_output=False,
                    peak=11 * t * d * by, bwd_peak=(6 * t * d + b * d) * by, cache=2 * b * d * by)
    proj = linear(s, d, 2 * d, p.bias)
    other = 10 * t * d + t * d * (3 * L + 2)
    return Cost(params=proj.params, fwd=proj.fwd, bwd=proj.bwd, fwd_other=other, bwd_other=2 * other + proj.bwd_other,
                saved=3 * t * d * by, saves_input=True, saves_output=True,
                peak=sp.Max(3 * t * d, 2 * t * d + b * (2 * sp.Min(T, n) - 1) * d) * by,
                bwd_peak=(4 * t * d + b * d) * by, cache=b * d * by)
