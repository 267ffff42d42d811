"""The cost of mha(moba) (moba.py): the projections, the gate (the queries against the mean keys of the M = ceil(n/B)
blocks and k padding blocks, without autograd), the k selected blocks' keys and values gathered per query, and one
SDPA call of n rows against k B keys each."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import LSE_BYTES, attention_cost, head_symbols


def moba_cost(p, env: OpEnv, s: Symbols) -> Cost:
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    B, k = s.sym("B", p.block), s.sym("k", p.topk)
    C = sp.ceiling(n / B) + k  # the gate's blocks
    keys = k * B  # per query
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    gate = Cost(fwd=2 * b * h * n * C * dh, fwd_other=b * kv * C * B * dh + 3 * b * h * n * C)
    core = Cost(fwd=4 * b * h * n * keys * dh, bwd=10 * b * h * n * keys * dh, fwd_other=5 * b * h * n * keys,
                bwd_other=10 * b * h * n * keys)
    g = b * h * n * keys * dh * by  # one of the gathered keys, values [b, h, n, k B, dh]
    lse = LSE_BYTES * b * h * n
    P = b * kv * C * B * dh * by  # k (v) padded to C blocks
    means = b * kv * C * dh * by
    expand = b * h * C * dh * by if kv != h else 0  # the mean keys repeated to the query heads
    G = b * h * n * C * by  # the gate's scores
    sel = 8 * b * h * n * k  # the chosen blocks (int64)
    keep, fmask = b * h * n * keys, b * h * n * keys * by  # the bool mask; the kernel's float copy of it
    qc = q * sp.Min(1, b - 1)  # q made contiguous for the gate's matmul and SDPA's rows (a view at b = 1)
    pos = 8 * b * h * n * keys  # the selected keys' positions (int64), the gathers' index
    saved = 2 * q + qc + 2 * g + lse + fmask + pos + 8 * C * B  # SDPA's q (contiguous), gathered k, v, o,
    # logsumexp, mask; the gathers' indices (the keys', the blocks' for the mean keys); o_proj's copy of the output
    qkv = q + 2 * kvb + 2 * P
    phases = [qkv + means + expand + qc + G,  # the gate's matmul (q made contiguous)
              qkv + means + G + n * C,  # the gate's masks (+inf own block, -inf after), in place
              qkv + sel + pos + 2 * g,  # the keys and values gathered
              qkv + sel + 2 * g + keep + qc + fmask + q + lse,  # SDPA
              q + 2 * kvb + 2 * q + out]  # at o_proj
    bwd = [2 * g + 2 * q - qc]  # the gradients of q and of the gathered k, v (o's, o_proj's copy released; at
    # b = 1 the rows' gradient a second q beside its view's)
    return attention_cost(p, s, h, kv, dh, gate + core, Cost(), saved, phases,
                          cache=2 * b * n * kv * dh * by + b * kv * sp.floor(n / B) * dh * by, bwd_phases=bwd)
