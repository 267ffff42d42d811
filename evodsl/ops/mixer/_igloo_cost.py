"""The cost of mixer(igloo) (igloo.py): the convolution, the compression, the patch sums gathered from C W_B, the
P x P mix, the values and their P gathers, the output projection."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from ._igloo_step import reach

INDEX_BYTES = 8  # int64 positions


def igloo_cost(p, env: OpEnv, s: Symbols) -> Cost:
    b, n, d, by = s.b, s.n, s.d, s.bytes
    k, P, L, c = s.sym("k", p.kernel), s.sym("P", p.patches), s.sym("L", p.patch), s.sym("c", p.compress)
    t = b * n
    conv = Cost(params=d * d * k + (d if p.bias else 0), fwd=2 * t * d * d * k, bwd=4 * t * d * d * k,
                fwd_other=t * d * 2, bwd_other=t * d * (3 if p.bias else 2))  # LeakyReLU; the bias's row sum
    patches = Cost(params=c * P * L + P, fwd=2 * t * c * P * L, bwd=4 * t * c * P * L,
                   fwd_other=3 * t * P * L + t * P, bwd_other=6 * t * P * L)  # C W_B; gather, mask, sum, bias
    gathers = Cost(fwd_other=2 * t * P * d, bwd_other=4 * t * P * d)  # sum_p a_tp v[j']
    total = (conv + linear(s, d, c, False) + patches + linear(s, P, P, False) + linear(s, d, d, False) + gathers
             + linear(s, d, d, p.bias))
    X = t * d * by
    padded = X * (n + k - 1) / n  # the convolution's input, transposed and padded
    PL = n * P * L  # the patch table's entries
    idx = PL * INDEX_BYTES  # flat positions (kept by the gather)
    saved = (padded + X + X  # the convolution's input, LeakyReLU's, the features (made contiguous for the linears)
             + t * c * by + idx + PL * by  # C (for C W_B); the gather's positions; the inside mask
             + t * P * by + n * P * by + t * P * by  # the mix's input s; the value mask; the weights a
             + P * X + P * n * INDEX_BYTES + X)  # each gathered value and its positions; the output projection's input
    tPL = t * P * L * by  # [b, n, P L]: C W_B, its gather, the masked gather
    phases = [sp.Max(X + padded, 3 * X),  # the convolution; LeakyReLU beside it, made contiguous
              X + 3 * tPL + idx + PL * by,  # the patches: C W_B gathered, times the inside mask (and the positions)
              # a gathered value weighted, beside v and the sum (and a; P = 1: the first product is the sum)
              (3 + sp.Min(1, P - 1)) * X + t * P * by + n * P * INDEX_BYTES,
              2 * X]  # the output projection
    R = s.sym("R", reach(p.spread))  # decoding (_igloo_step.py): the last k - 1 inputs, the last R C and values
    cache = b * by * (sp.Min(n, k - 1) * d + sp.Min(n, R) * (c + d))
    return Cost(params=total.params, fwd=total.fwd, bwd=total.bwd, fwd_other=total.fwd_other,
                bwd_other=total.bwd_other, saved=saved, peak=sp.Max(*phases) - X, cache=cache,
                saves_input=False, saves_output=False,  # the convolution keeps its padded copy
                # the backward's peak, in the gathers': v's gradient beside one gather's (put into zeros), a's beside
                # one column's
                bwd_peak=2 * X + t * P * by + t * by)
