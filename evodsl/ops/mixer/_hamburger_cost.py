"""The cost of mixer(hamburger) (hamburger.py): the two breads (linear maps d -> e -> d), the ham's K steps on
X [e, n] with D [e, r] and C [r, n] (as the code holds them: X^T [b, n, e], C^T [b, n, r], D [b, e, r]), the output
D C. Symbols: e (d_ham, d unless set), r, K. The paper's O((K + 1) n r d + K d r^2), with the n r^2 of C C^T and
D^T D C that it folds into n r d (r < d)."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv


def hamburger_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """Matmul FLOPs (2 a multiply-add): NMF, C's init X^T D (2 n e r), per step X^T D, (D^T D), C^T (D^T D), X C^T,
    C C^T, D (C C^T) (4 n e r + 4 n r^2 + 4 e r^2), the output C^T D^T (2 n e r); soft VQ, per step the cosines
    X^T D and the centres X C^T (4 n e r), the output. Backward: the last step alone (the others ran without
    autograd), each matmul's gradient wrt the operands that carry one (D and C of step K - 1 are constants):
    NMF X^T D (wrt X), X C^T (both), C C^T (both), D (C C^T) (wrt C C^T), the output (both); VQ the cosines
    (wrt X), the centres and the output (both). Other FLOPs (a convention, not measured): 1 an element of the
    elementwise products, quotients and relu, 5 a softmax entry. Bytes (X = b n e, R = b n r, E = b e r):
    saved, the relu'd X (VQ: X; its unit columns' norms, [b, n] twice), the upper bread's input D C, and the last
    step's operands: NMF C, its divisor and the new C (3 R), D of step K - 1 (K > 1: at K = 1 the fixed init,
    a buffer), D's divisor and the new D; VQ C, the normalized D, the new D and its counts, [b, r]. Inference
    peak, at the upper bread: X, D C, C and D beside its output (VQ: and X's unit columns). Backward: NMF, the
    upper bread's gradient (X), or the two gradients of X from the last step's matmuls and their sum with D C
    and the step's saved R and E released; VQ, the normalization's backward (four [b, n, e]) beside the
    gradient from the centres. The memory formulas are those of the paper's regime, r well below e and n (held
    to measurement up to r = e / 6; the paper's r = d / 8): past it the steps' [., r] temporaries lead the peaks."""
    b, n, d, by = s.b, s.n, s.d, s.bytes
    e = s.sym("e", p.d_ham) if p.d_ham is not None else d
    r, K = s.sym("r", p.r), s.sym("K", p.steps)
    ner, nr2, er2 = b * n * e * r, b * n * r * r, b * e * r * r
    bread = linear(s, d, e, p.bias) + linear(s, e, d, p.bias)
    if p.kind == "nmf":
        fwd = (4 * K + 2) * ner + 4 * K * (nr2 + er2)
        bwd = 10 * ner + 4 * nr2 + 2 * er2
        other = b * n * e + 5 * b * n * r + K * (4 * b * n * r + 4 * b * e * r)
    else:
        fwd = (4 * K + 2) * ner
        bwd = 10 * ner
        other = 3 * b * n * e + K * (7 * b * n * r + 3 * b * e * r)
    X, R, E = b * n * e * by, b * n * r * by, b * e * r * by
    if p.kind == "nmf":
        late = E if p.steps > 1 else 0  # D of step K - 1 (at K = 1 the fixed init, a buffer)
        saved = 2 * X + 3 * R + 3 * E + late
        peak = 2 * X + R + E
        bwd_peak = sp.Max(X, 2 * X - 3 * R - 3 * E - late)
    else:
        saved = 2 * X + R + 3 * E + (2 * b * n + b * r) * by
        peak = 3 * X + R + E
        bwd_peak = 5 * X - 3 * E - R - b * r * by
    return Cost(params=bread.params, fwd=bread.fwd + fwd, bwd=bread.bwd + bwd, fwd_other=other,
                bwd_other=bread.bwd_other + 2 * other, saved=saved, saves_input=True, peak=peak, bwd_peak=bwd_peak)
