"""What mha(based) and mha(hedgehog) share: normalised causal linear attention over given features, run by the chunked
kernel of _chunked_linear.py (no decay: g = 0), its recurrent step (decoding) and its one-piece parallel form (a
symbolic n, the export).

Per head, with features phi(q_t), phi(k_j) in R^F and values v_j in R^dv:

    o_t = phi(q_t)^T S_t / phi(q_t)^T z_t,      S_t = sum_{j<=t} phi(k_j) v_j^T,   z_t = sum_{j<=t} phi(k_j)

computed as one recurrence on the values with a column of ones after them ([S z] = sum_j phi(k_j) [v_j 1]^T: the
state [F, dv + 1] a head); the caller's features keep the denominator positive. A padded position's features are
zeroed by the caller: it adds nothing to S or z; a query with no key before it (left padding) reads 0.
"""
from __future__ import annotations

import torch.nn.functional as F

from ._chunked_linear import chunked_decay, parallel_decay, recurrent_decay


def normalised(fq, fk, v, state=None, chunk: int = 64, step: bool = False, symbolic: bool = False):
    """fq, fk [b, h, n, F], v [b, h, n, dv], the state [b, h, F, dv + 1] or None -> (o [b, h, n, dv], the state
    after; None in the one-piece form)."""
    b, h, n, _ = fq.shape
    v1 = F.pad(v, (0, 1), value=1.0)
    g = fq.new_zeros(b, h, n)
    if symbolic:
        o, s = parallel_decay(fq, fk, v1, g), None
    elif step:
        o, s = recurrent_decay(fq, fk, v1, g, state)
    else:
        o, s = chunked_decay(fq, fk, v1, g, state, chunk)
    den = o[..., -1:]
    return o[..., :-1] / (den + (den == 0).to(den.dtype)), s  # a query with no key yet (left padding): 0, not 0 / 0
