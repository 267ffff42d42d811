"""The cost of mha(fixed) (fixed.py): v_proj and o_proj (the only matmuls, and the global and vertical means' matmul
in a bidirectional model), and what each pattern's map keeps and builds: shifted copies of V (prev, next), the band's
padded V and its sum (local), cumulative sums (causal global and vertical), the mean broadcast to every position
(bidirectional global and vertical). Memory in units of V over the heads a pattern runs on."""
from __future__ import annotations

from dataclasses import replace

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from ._common import head_symbols


def _pattern(pat: str, causal: bool, w, U, s: Symbols):
    """One pattern over heads whose V is U bytes: (its map's FLOPs as a Cost, the bytes it saves beyond its result,
    the bytes alive at its peak beside its input (the result included), its result's bytes, its backward's peak)."""
    n, by = s.n, s.bytes
    elems = U / by
    if pat == "diagonal":
        return Cost(), 0, 0, 0, U
    if pat in ("prev", "next"):
        return Cost(), n, U * (n + 1) / n + U, U, 2 * U  # V padded by one, the choice (its bool mask kept)
    if pat == "local":
        right = 0 if causal else w
        ops = Cost(fwd_other=(w + right + 1) * elems, bwd_other=2 * (w + right + 1) * elems)
        padded = U * (n + w + right) / n
        # the padded V and the sum (the result); backward: the slices' gradients, each as large as the padded V, summed
        return ops, n * by, padded + U, U, 3 * padded
    # global, vertical: the mean over the keys (causal: cumulative)
    if causal:
        ops = Cost(fwd_other=3 * elems, bwd_other=6 * elems)
        weights = 2 * n * by if pat == "vertical" else n * by  # the counts (and the vertical weights)
        return ops, weights, 2 * U, U, 3 * U  # the cumulative sums and their quotient
    mean = Cost(fwd=2 * elems, bwd=2 * elems)  # [b, 1, n] weights @ V: one matmul (its gradient wrt V backward)
    return mean, n * by, U, U, U


def fixed_cost(p, env: OpEnv, s: Symbols) -> Cost:
    from .fixed import head_patterns

    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    w = s.sym("w", p.window) if p.window else 0
    V, O, X = b * n * kv * dh * by, b * n * h * dh * by, b * n * s.d * by
    total = linear(s, s.d, kv * dh, p.bias) + linear(s, h * dh, s.d, p.bias)
    pats = head_patterns(p, env.causal)
    groups = list(dict.fromkeys(pats))
    grouped = kv != h
    if len(groups) == 1:
        pat = groups[0]
        ops, small, inner, R, bwd = _pattern(pat, env.causal, w, V, s)
        fresh = O if grouped or pat != "diagonal" else 0  # o_proj's input: new, or V itself
        phases = [V + inner, V + fresh + X]
        if grouped:
            phases.append(V + R + O)  # the result repeated to the query heads
            bwd = sp.Max(O, V + bwd - O)  # o's gradient; then summed to the K/V heads (o_proj's input released)
        saved = O + small
    else:  # mixed: every query head's V (repeated under grouped K/V heads), each group's heads picked out by index,
        # their results concatenated and put back in head order
        Vh = O if grouped else 0
        ops, saved, bwd, inner, outs = Cost(), O, 0, [], 0
        for pat in groups:
            U = O * sp.Rational(pats.count(pat), p.heads)
            o, small, peak, R, _ = _pattern(pat, env.causal, w, U, s)
            ops, saved = ops + o, saved + small
            inner.append(outs + U + peak)
            outs += R if pat != "diagonal" else U
            bwd = sp.Max(bwd, U) if bwd else U
        # backward: o's gradient (o_proj's input released), the gradients put back through the head order and into
        # every head's V, and one group's own
        bwd = 3 * O + bwd
        phases = [V + Vh + sp.Max(*inner), V + Vh + outs + 2 * O, V + O + X]  # a group's map; the concatenation
        # put back in head order; o_proj
    # decoding (_fixed_step.py): V of the last R positions (local: w, prev: 1) and a sum of V per global / vertical
    R = sp.Max(w if "local" in groups else 0, 1 if "prev" in groups else 0)
    cache = b * kv * dh * by * (sp.Min(n, R) + int("global" in groups) + int("vertical" in groups))
    # the backward's peak: the map's, or v_proj's (the input's gradient beside V's, everything saved released)
    return replace(total + ops, saved=saved, peak=sp.Max(*phases) - X, cache=cache, saves_input=True,
                   saves_output=False, bwd_peak=sp.Max(bwd, X + V - saved))
