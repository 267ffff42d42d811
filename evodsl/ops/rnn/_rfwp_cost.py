"""The cost of rnn(rfwp) (rfwp.py): the input projections at once, then per token the recurrent core's products
(h R_q, h R_k, h R_v, h r_b, k S, q S) and its elementwise update; the fast weights of every token kept for the
backward."""
from __future__ import annotations

from dataclasses import replace

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv


def rfwp_cost(p, env: OpEnv, s: Symbols) -> Cost:
    H = s.sym("H", p.heads)
    dh = s.sym("dh", p.head_dim) if p.head_dim else s.d / H
    b, n, by = s.b, s.n, s.bytes
    tokens = b * n * H
    core = Cost(params=3 * H * dh ** 2 + H * dh, fwd=tokens * (10 * dh ** 2 + 2 * dh), bwd=2 * tokens * (10 * dh ** 2 + 2 * dh))
    total = linear(s, s.d, 3 * H * dh + H, p.bias) + core + linear(s, H * dh, s.d, p.bias)
    state = b * H * dh ** 2 * by
    saved = n * state + 12 * tokens * dh * by
    peak = 2 * state + 3 * tokens * dh * by
    return replace(total, saved=saved, peak=peak, cache=state + b * H * dh * by, bwd_peak=2 * n * state,
                   saves_input=True)
