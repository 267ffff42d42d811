"""The cost of rnn(sru) (sru.py), from the form that runs: t = b n tokens, d the width, T = chunk, L = ceil(log2 T).

FLOPs in matmuls: W x, Linear(d, 3 d), 6 t d^2; backward twice. Other FLOPs (a convention): the token loop's
elementwise core, ~14 t d (two gates with v . c, the cell update), or the parallel form's gates and scan (3 a
state a level, 2 for the carry); the highway r (c - x) + x, 3 t d; backward twice.
Kept for backward: the token loop's gates, differences and cells stacked or held per token, 6 t d; the parallel
form's W x (3 t d, its split parts' storage), f, r, 1 - f, c and c - x (8 t d in all). The input besides.
Inference peak (less the output), read off the storage tracker: 6 t d + b d (the loop: W x, the per-token cells
and gates and their stacked copies) or 8 t d (the parallel form: W x, the gates and the scan's tensors).
Backward's peak: 3 t d at the highway's backward, the gradients of r, of c - x and of x (the loop's per-token
gradients are [b, d] each, gathered by unbind's backward into one [b, n, 3 d] once the kept gates are released), or
6 t d + b d (the parallel form's gradients and the reverse scan's zero decay).
SRU++ (attention=true, p = proj): W x becomes W_o (Q + alpha A): three projections (2 t p (d + 2 p + 3 d)) and one
causal head, counted over all n^2 pairs as FlopCounterMode counts SDPA, 4 b n^2 p forward and 10 b n^2 p backward
(the scores recomputed); it keeps Q, K and V, A, Q + alpha A (5 t p) and SDPA's logsumexp (b n) besides; the peaks
are the recurrence's (p = d / 4 by default).
Decoding: c, b d, whatever n; with SRU++'s attention also the keys and values of every position, 2 b p n.
"""
from __future__ import annotations

from ..cost import Cost, linear
from ..registry import OpEnv
from ._diag_scan import levels


def sru_cost(p, env: OpEnv, s) -> Cost:
    d, b, n, by = s.d, s.b, s.n, s.bytes
    t = b * n
    W = linear(s, d, 3 * d, False)
    att = 0
    if p.attention:
        P = s.sym("p", max(1, env.d // 4) if p.proj is None else p.proj)
        W = linear(s, d, P, False) + linear(s, P, 2 * P, False) + linear(s, P, 3 * d, False)
        W = Cost(params=W.params + 1, fwd=W.fwd + 4 * b * n * n * P, bwd=W.bwd + 10 * b * n * n * P)
        att = P
    extra = 5 * t * att + (b * n if p.attention else 0)  # SRU++: Q, K and V, A, Q + alpha A; the logsumexp [b, n]
    if p.scan:
        other = 6 * t * d + t * d * (3 * len(levels(p.chunk)) + 2) + 3 * t * d
        saved, peak, bwd_peak = 8 * t * d, 8 * t * d, 6 * t * d + b * d
    else:
        other = 14 * t * d + 3 * t * d
        saved, peak, bwd_peak = 6 * t * d, 6 * t * d + b * d, 3 * t * d
    return Cost(params=W.params + 2 * d + (0 if p.scan else 2 * d), fwd=W.fwd, bwd=W.bwd, fwd_other=other,
                bwd_other=2 * other + 2 * t * d, saved=(saved + extra) * by, saves_input=True, peak=peak * by,
                bwd_peak=bwd_peak * by, cache=(b * d + 2 * b * att * n) * by)
