"""The cost of mha(softmax, collab=D_k) (_collab.py), written from the form that runs (conventions: _common.py).

Projections: W_Q, W_K d x D_k (no bias), the content bias d x h (with bias=true), the mixing vectors h x D_k, V
d x kv dh and W_O as mha's. The queries [b, h, n, E] (E = D_k + h with the content bias, D_k without): q * m_i, 1
per element, and the one-hot columns; the shared key [b, n, E] read through a view expanded to the kv value heads.
SDPA over [b, h, n, n] scores at one width W = max(E, dh) (q and k, or v, zero-padded: SDPA's fused kernels take
no other): 4 n^2 W per head forward, 10 n^2 W backward (8 with dropout: the math kernel).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import fields, replace

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from ..position._inattention import InAttentionPosition
from ._common import LSE_BYTES, head_symbols


def collab_cost(p, env: OpEnv, s: Symbols) -> Cost:
    h, kv, dh = head_symbols(p, s)
    b, n, d, by = s.b, s.n, s.d, s.bytes
    Dk = s.sym("Dk", p.collab)
    E = Dk + h if p.bias else Dk
    W = sp.Max(E, dh)  # the one width SDPA runs at (the narrower of q, k and v zero-padded)
    scores = b * h * n ** 2
    proj = (linear(s, d, Dk, False).scaled(2) + (linear(s, d, h, False) if p.bias else Cost())
            + linear(s, d, kv * dh, p.bias) + linear(s, h * dh, d, p.bias))
    mixing = Cost(params=h * Dk, fwd_other=b * h * n * Dk, bwd_other=2 * b * h * n * Dk)
    dropout = p.dropout > 0
    core = Cost(fwd=4 * scores * W, bwd=10 * scores * W, fwd_other=5 * scores, bwd_other=10 * scores)
    qD = b * n * Dk * by  # W_Q's output, which q * m_i keeps for m's gradient
    q, k, v = b * h * n * W * by, b * n * W * by, b * kv * n * W * by  # what SDPA reads (k: one key, a view)
    o_copy = b * n * h * dh * by  # o_proj's input: SDPA's output, its padded columns cut, made contiguous
    saved = qD + q + k + v + q + LSE_BYTES * b * h * n + o_copy  # .., SDPA's output and logsumexp, o_proj's input
    bwd = 2 * q + 2 * v - o_copy  # the gradients of SDPA's output (the cut's, full width), q, k (per value head,
    # before the expansion sums it) and v, o_proj's copy released
    if dropout:  # SDPA's math kernel (the fused CPU kernel has none), in float32: q (scaled), k and v expanded to h
        # heads; the weights, the dropout mask, the dropped weights
        core = replace(core, bwd=8 * scores * W)
        saved = qD + 3 * b * h * n * W * max(by, 4) + 3 * scores * max(by, 4) + o_copy
        bwd = q + scores * max(by, 4) + o_copy + qD  # measured: the weights' gradient beside o's and q's
    peak = q + k + v + q + o_copy  # at o_proj: q, k, v, SDPA's output and its copy (the output not counted)
    cache = 2 * b * n * kv * W * by  # the key per value head, the values (zero-padded to W)
    total = proj + mixing + core
    return replace(total, saved=saved, peak=peak, cache=cache, saves_input=True, saves_output=False, bwd_peak=bwd)


class _ContiguousQ:
    """A stand-in position scheme for the band's cost: none of its own cost, but q laid out as after a rotation
    (contiguous [b, h, n, W], as collab_qkv makes it), which the band's copies follow (_banded.py)."""

    class attach(InAttentionPosition):
        def rotate(self, q, k, offset: int = 0):  # never run: its identity is what rotates() reads
            return q, k

    id = "collab layout"
    attach_cost = staticmethod(lambda params, s, h, kv, dh: Cost())


def collab_local_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """mha(local, window=w, collab=D_k): the banded kernel's cost (_banded.py) at head width W = max(E, dh), less
    mha's q, k projections and plus collab's (shared W_Q, W_K, the content bias, the mixing vectors, the scale
    factor folded into them); decoding caches the last w keys (one per value head) and values at width W."""
    from ._banded import band_layout, banded_attention_cost
    from ._common import projections_cost

    h, kv, dh = head_symbols(p, s)
    b, n, d = s.b, s.n, s.d
    Dk = s.sym("Dk", p.collab)
    W = sp.Max(Dk + h if p.bias else Dk, dh)
    width = max(p.collab + (p.heads if p.bias else 0), p.head_dim or s.values[d] // p.heads)
    wide = p.model_copy(update={"collab": None, "head_dim": width})  # the kernel's view: heads W wide
    s2 = copy.copy(s)
    s2.values = dict(s.values)
    w = s2.sym("w", p.window)
    laid = dataclasses.replace(env, pos=(_ContiguousQ, None))
    band = banded_attention_cost(wide, laid, s2, lo=w - 1, hi=0 if env.causal else w - 1, cache_keys=w)
    h2, kv2, W2 = head_symbols(wide, s2)
    s.values.update({k: v for k, v in s2.values.items() if k.name != "dh"})
    band = band + projections_cost(wide, s2, h2, kv2, W2).scaled(-1)
    band = Cost(**{f.name: _at(getattr(band, f.name), W2, W) for f in fields(Cost)})
    proj = (linear(s, d, Dk, False).scaled(2) + (linear(s, d, h, False) if p.bias else Cost())
            + linear(s, d, kv * dh, p.bias) + linear(s, h * dh, d, p.bias))
    # q * m_i (D_k a head; the scale factor folded into m_i and e_i)
    mixing = Cost(params=h * Dk, fwd_other=b * h * n * Dk, bwd_other=2 * b * h * n * Dk)
    total = band + proj + mixing
    by = s.bytes
    qD, cut = b * n * Dk * by, b * n * h * (W - dh) * by  # W_Q's output (q * m_i keeps it); o_proj's copy at dh
    # the shared key is one [b, n, W] tensor read as kv heads (a view): the band counts kv of them; unpadded (the
    # band as wide as the sequence: no zero-padded copy), SDPA keeps that view, not h heads (kv = h)
    kW = b * n * W * by
    _, _, _, L = band_layout(n, w - 1, 0 if env.causal else w - 1, wide=True)
    unpadded = (1 - sp.Min(1, L - n)) * (h - 1) * kW if kv == h else 0
    # inference: one call (n <= w): o_proj's copy is dh wide, not W; the causal band's blocks: their output
    # [b, n, h, W] cut to dh for o_proj, a copy (measured: half of it more at the peak with kv = h, where the blocks'
    # phase leads; 0.7 to 1 of it at w = 16, 0.4 at w = 100, n = 64 and 160)
    peak = total.peak - (kv - 1) * kW
    blocks = b * n * h * dh * by / 2 if env.causal and kv == h else 0
    peak = sp.Piecewise((peak - cut, n <= w), (peak + blocks, True))
    # backward: o's gradient comes zero-padded to W (the cut's), not dh wide
    return replace(total, saved=total.saved + qD - cut - unpadded, peak=peak, bwd_peak=total.bwd_peak + cut,
                   saves_input=True, saves_output=False)


def _at(expr, old, new):
    """expr with the symbol `old` (the kernel's head width) replaced by `new`."""
    return expr.xreplace({old: new}) if isinstance(expr, sp.Basic) else expr
