"""The cost of mha(colt5) (colt5.py): two routers, the heavy softmax attention of K_q = min(k_q, n) routed
queries over K_kv = min(k_kv, n) routed keys and values (its projections on those rows only), and the light band
as mha(local) costs it (_banded.py's formulas, its heads renamed h_l beside the heavy heads h)."""
from __future__ import annotations

from dataclasses import fields, replace

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..ffn._colt5_cost import INDEX, router_cost
from ..registry import OpEnv
from ._common import LSE_BYTES, head_symbols
from .local import local_attention_cost


def light_cost(p, env: OpEnv, s: Symbols, dh) -> Cost:
    """mha(local)'s cost of the light attention (light_heads heads of width dh), over its own symbols, with its
    heads renamed h_l and its head width the heavy heads' dh."""
    from .colt5 import light_params

    lp = light_params(p, env.d // p.heads if p.head_dim is None else p.head_dim)
    s2 = Symbols(env.d, s.bytes)
    c = local_attention_cost(lp, OpEnv(in_shapes=env.in_shapes), s2)
    h2, dh2 = sp.Symbol("h", positive=True), sp.Symbol("dh", positive=True)
    hl = s.sym("h_l", lp.heads)
    for sym, value in s2.values.items():
        if sym not in (h2, dh2):
            s.values[sym] = value
    rename = {h2: hl, dh2: dh}

    def sub(v):
        return v.subs(rename, simultaneous=True) if isinstance(v, sp.Basic) else v

    return replace(c, **{f.name: sub(getattr(c, f.name)) for f in fields(Cost)
                         if f.type not in ("bool", "bool | None")})


def colt5_attention_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """Kept for backward, beyond the routers' (router_cost): the gathered query rows, the gathered key/value rows
    and their lambda-scaled copy; SDPA's q, k, v, output (o_proj's input, laid out as q) and logsumexp; o_proj's
    output and its lambda-scaled copy, and the query rows' flat index once more (index_add_); the light band's
    own. Inference peak: the heavy attention at o_proj (its rows, q, k, v, o, the projected output), or the light
    band's peak beside the heavy rows."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    Kq, Kkv = sp.Min(s.sym("k_q", p.k_q), n), sp.Min(s.sym("k_kv", p.k_kv), n)
    rq, rkv = router_cost(s, Kq), router_cost(s, Kkv)
    light = light_cost(p, env, s, dh)
    proj = (linear(s, s.d, h * dh, p.bias, tokens=b * Kq) + linear(s, s.d, kv * dh, p.bias, tokens=b * Kkv).scaled(2)
            + linear(s, h * dh, s.d, p.bias, tokens=b * Kq))
    scores = b * h * Kq * Kkv
    core = Cost(fwd=4 * scores * dh, bwd=10 * scores * dh, fwd_other=5 * scores + b * Kkv * s.d + b * Kq * s.d,
                bwd_other=10 * scores + 2 * (b * Kkv * s.d + b * Kq * s.d))
    out = b * n * s.d * by
    xq, xkv = b * Kq * s.d * by, b * Kkv * s.d * by
    q, k = b * Kq * h * dh * by, b * Kkv * kv * dh * by
    lse = LSE_BYTES * b * h * Kq
    saved = rq.saved + rkv.saved + INDEX * b * Kq + xq + 2 * xkv + q + 2 * k + q + lse + 2 * xq
    heavy_peak = xq + xkv + q + 2 * k + q + sp.Max(lse, xq)
    peak = rq.peak + rkv.peak + sp.Max(heavy_peak - out, xq + light.peak)
    # backward: the input's gradients (the light band's projections, the routers', the gathered rows' scattered
    # back) beside the heavy output's; or the light band's own peak
    bwd = 3 * out + xq
    total = rq + rkv + proj + core + light
    return replace(total, params=rq.params + rkv.params + proj.params + light.params, saved=light.saved + saved,
                   peak=peak, cache=0, saves_input=True, saves_output=False,
                   bwd_peak=sp.Max(light.bwd_peak, bwd))
