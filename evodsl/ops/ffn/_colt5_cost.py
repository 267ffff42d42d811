"""The cost of ffn(colt5) (colt5.py): the router, the light MLP on every token, the heavy MLP on K = min(k, n)
routed tokens per sequence (a fixed k: the heavy branch is constant in n, the op linear)."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, linear
from ..registry import OpEnv
from ._colt5_router import ROUTER_ITERS
from .mlp import ACT_FLOPS

INDEX = 8  # bytes of an int64 index


def routed(p, s):
    """K = min(k, n): the routed tokens per sequence."""
    return sp.Min(s.sym("k", p.k), s.n)


def router_cost(s, K) -> Cost:
    """s = x u (u [d, 1]: a matmul, 2 b n d; its gradients 4 b n d); the bisection's ROUTER_ITERS steps at ~6
    FLOPs per score, the closed form's ~8 (fwd_other).
    Kept for backward, [b, n] each: the closed form's exponent z, its exp, lambda (gathered from), the saturated
    set (bool); the logsumexp [b]; the routed positions (a slice of the sort's [b, n] int64 indices), the flat
    rows [b K] (int64) and their lambdas [b K]. `live`: what stays alive through the heavy and light branches
    (the sort's indices, the flat rows, the lambdas), `saved` what autograd keeps."""
    t, by = s.b * s.n, s.bytes
    bk = s.b * K
    saved = 3 * t * by + t + s.b * by + INDEX * (t + bk) + bk * by
    live = INDEX * (t + bk) + bk * by
    return Cost(params=s.d, fwd=2 * t * s.d, bwd=4 * t * s.d, fwd_other=(6 * ROUTER_ITERS + 8) * t, bwd_other=16 * t,
                saved=saved, peak=live)


def colt5_ffn_cost(p, env: OpEnv, s) -> Cost:
    """Router, then the heavy MLP on the b K gathered rows (kept: the rows, the activation's input and result,
    their output and its scaled copy), then the light MLP on every token (kept: its activation's input and
    result), the heavy rows added in place into its output. The inference peak: the heavy MLP's activation
    beside its input and hidden rows, or its output beside its hidden rows and the gathered rows, or the light
    MLP's activation (or its output) beside the scaled heavy rows. Backward: the input's three gradients (light,
    gathered rows scattered into a zero [b, n, d], router) and the heavy rows', net of what it has released; or
    an MLP's hidden gradients."""
    from .colt5 import widths

    lw, hw = widths(p, env.d)
    fl, fh = s.sym("f_l", lw), s.sym("f_h", hw)
    K = routed(p, s)
    bk, by = s.b * K, s.bytes
    light = linear(s, s.d, fl, p.bias) + linear(s, fl, s.d, p.bias)
    heavy = linear(s, s.d, fh, p.bias, tokens=bk) + linear(s, fh, s.d, p.bias, tokens=bk)
    act = ACT_FLOPS[p.act]
    other = act * s.b * s.n * fl + act * bk * fh + bk * s.d  # the activations; the scaling by lambda
    r = router_cost(s, K)
    out = s.b * s.n * s.d * by
    hl, hh, rows = s.b * s.n * fl * by, bk * fh * by, bk * s.d * by
    nact = 1 if p.act == "relu" else 2  # relu keeps its result only
    saved = r.saved + rows + nact * hh + 2 * rows + nact * hl
    phases = [rows + 2 * hh, 2 * rows + hh, rows + 2 * hl, rows + hl + out]
    # backward, net of the saved tensors released: each MLP's activation gradient beside its hidden gradient
    # (relu: both hidden gradients; the heavy one's with the scaled rows and their copy released)
    bwd = [2 * hl, 2 * hh - 3 * rows / 2] if p.act == "relu" else [hl + out, hh - rows]
    c = light + heavy
    return Cost(params=r.params + c.params, fwd=r.fwd + c.fwd, bwd=r.bwd + c.bwd, fwd_other=r.fwd_other + other,
                bwd_other=r.bwd_other + c.bwd_other + 2 * other, saves_input=True, saved=saved,
                peak=r.peak + sp.Max(*phases) - out, bwd_peak=sp.Max(3 * out + rows, *bwd))
