"""The cost of mha(synthesizer) (synthesizer.py, _synthesizer_logits.py), with no padding mask: the V (and, with
vanilla, Q and K) projections, each kind's logits, softmax(S), S V and o_proj. S is [h, n, n] when it is the same
for every sequence (random, factorized_random and their sum, unmasked by padding; S V then one matmul per head
over the batch folded into the columns), else [b, h, n, n]: O(n^2) bytes either way, kept for backward."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from ._common import head_symbols
from ._synthesizer_logits import components, factors


def synthesizer_cost(p, env: OpEnv, s: Symbols) -> Cost:
    h, kv, dh = head_symbols(p, s)
    b, n, d, by = s.b, s.n, s.d, s.bytes
    kinds = components(p)
    L = s.sym("L", p.max_len)
    H = s.sym("H", p.hidden) if p.hidden else d
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * d * by
    shared = set(kinds) <= {"random", "factorized_random"}
    e = (1 if shared else b) * h * n * n  # elements of S
    S, Sb, S1 = e * by, b * h * n * n * by, h * n * n * by
    mix = p.kind == "mixture"
    total = linear(s, d, kv * dh, p.bias) + linear(s, h * dh, d, p.bias)  # v_proj, o_proj
    grad_w = not (kinds == ("random",) and not p.trainable)  # S V's backward: the weights' gradient too
    total += Cost(fwd=2 * b * h * n * n * dh, bwd=(4 if grad_w else 2) * b * h * n * n * dh,
                  fwd_other=6 * e + (n * n if env.causal else 0), bwd_other=12 * e)
    # the weights, V as S V reads it (only for the weights' gradient), o_proj's input; the mask
    saved = S + (2 if grad_w else 1) * q + (n * n if env.causal else 0)
    base = kvb  # alive through the op: V
    build = [0]  # the live bytes while the logits are built, beside base
    hid, hold = b * n * H * by, 0
    if {"dense", "factorized_dense"} & set(kinds):
        total += linear(s, d, H, p.bias) + Cost(fwd_other=b * n * H, bwd_other=b * n * H)
        saved += hid  # relu's output, the next linear maps' input
        hold = hid
    for c, kind in enumerate(kinds):
        part = Sb if kind in ("dense", "factorized_dense", "vanilla") else S1 if kind == "factorized_random" else 0
        size = S1 if kind in ("random", "factorized_random") else Sb  # part's shape; part: the bytes it allocates
        live = (S1 if set(kinds[:c]) <= {"random", "factorized_random"} else Sb) if c else 0  # the sum so far
        if kind == "dense":
            bias = h * L if p.bias else 0
            total += Cost(params=h * L * H + bias, fwd=2 * b * n * H * h * n, bwd=4 * b * n * H * h * n,
                          fwd_other=b * h * n * n * (2 if p.bias else 1), bwd_other=b * h * n * n)
            w2 = sp.Min(1, L - n) * h * n * H * by  # W2 cut to n < L rows: a copy (at n = L, W2 itself)
            saved += w2
            build.append(live + w2 + 2 * Sb)  # the cut W2, the matmul's output and its [b, h, n, n] copy
        elif kind == "random":
            total += Cost(params=h * L * L if p.trainable else 0)
        elif kind == "factorized_random":
            r = s.sym("k", p.rank)
            total += Cost(params=2 * h * L * r, fwd=2 * h * n * n * r, bwd=4 * h * n * n * r)
            build.append(live + S1)
        elif kind == "factorized_dense":
            a = s.sym("a", factors(p))
            total += linear(s, H, h * a, p.bias) + linear(s, H, h * L / a, p.bias)
            total += Cost(fwd_other=3 * b * h * n * n, bwd_other=4 * b * h * n * n)
            saved += 2 * Sb  # the gathered A and B
            build.append(live + b * n * h * (a + L / a) * by + 3 * Sb)
        else:  # vanilla
            total += linear(s, d, h * dh, p.bias) + linear(s, d, kv * dh, p.bias)
            total += Cost(fwd=2 * b * h * n * n * dh, bwd=4 * b * h * n * n * dh, fwd_other=b * h * n * n)
            saved += 2 * q  # Q and K as the matmul reads them (copies)
            base += q + kvb
            build += [live + 2 * q + Sb, live + 2 * Sb]  # Q, K copied for the matmul, its output; then scaled
        if mix:
            saved += part  # alpha_c S_c keeps S_c
            total += Cost(fwd_other=2 * e, bwd_other=4 * e)
            build.append(live + part + size)  # S_c and alpha_c S_c
            if c:
                build.append(live + size + (S1 if set(kinds[:c + 1]) <= {"random", "factorized_random"} else Sb))
    if mix:
        total += Cost(params=h * len(kinds))
    alloc = 0 if kinds == ("random",) else S  # the logits (random's: a view of R)
    i = 8 * n if env.causal else 0  # the query positions (int64)
    phases = [base + hold + max_(build)]  # relu(W1 x) alive while any logits are built
    if env.causal:
        phases.append(base + alloc + S + n * n)  # S masked beside S, the bool mask
    # V as S V reads it: copied (grouped heads repeated; the batch folded; [b, h, n, dh] from [b, n, h, dh] at b > 1)
    vcopy = q if kv != h else sp.Min(1, b - 1) * q
    phases += [base + (S if env.causal else alloc) + S + i,  # the softmax
               base + S + vcopy + q + i,  # S V: its output
               base + 2 * q + out]  # o_proj
    peak = sp.Max(*phases) - out
    # backward wrt the input: S's gradient and the softmax's beside V's (none where S reads no token: the random
    # kinds, whose backward is V's alone)
    bwd_peak = (q + (kvb * (1 - sp.Min(1, b - 1)) if kv != h else 0)) if shared else 2 * S - 2 * q + kvb
    return Cost(params=total.params, fwd=total.fwd, bwd=total.bwd, fwd_other=total.fwd_other,
                bwd_other=total.bwd_other, saved=saved, saves_input=True, peak=peak,
                cache=b * n * kv * dh * by * (2 if "vanilla" in kinds else 1), bwd_peak=bwd_peak)


def max_(xs):
    return sp.Max(*xs) if len(xs) > 1 else xs[0]
