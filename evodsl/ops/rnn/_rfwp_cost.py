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
    state, tv = b * H * dh ** 2 * by, tokens * dh * by
    proj = b * n * (3 * H * dh + H) * by  # the input projections of every token, computed at once
    # kept: the fast weights after every token and the first (zero, read by the first k S), three vectors a token and
    # head (tanh(y), the softmaxes of q and k), the projections; the inference peak: the state, the outputs and their
    # stack, the projections; the backward's: the heads' gradient (o_proj's input), the loop's pieces smaller
    saved = n * state + state + 3 * tv + proj
    peak = state + 2 * tv + proj
    return replace(total, saved=saved, peak=peak, cache=state + b * H * dh * by, bwd_peak=tv,
                   saves_input=True)
