"""The cost of mha(probsparse) (probsparse.py): the projections, the sparsity measurement (the U sampled keys
gathered per query and scored, without autograd), the top u queries gathered and one SDPA call of u rows against
every key, the mean of V written to every row and the active rows scattered over it. u = U = min(c ceil(ln n), n)."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import LSE_BYTES, attention_cost, head_symbols, position_cost, rotates

MEASURE_CHUNK = 64  # queries measured at once (their sampled keys [b, kv, C U, dh] in one workspace)


def probsparse_cost(p, env: OpEnv, s: Symbols) -> Cost:
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    c = s.sym("c", p.factor)
    u = sp.Min(c * sp.ceiling(sp.log(n)), n)
    pos = position_cost(env, s, h, kv, dh)
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    measure = Cost(fwd=2 * b * h * n * u * dh, fwd_other=4 * b * h * n * u)
    core = Cost(fwd=4 * b * h * u * n * dh, bwd=10 * b * h * u * n * dh, fwd_other=5 * b * h * u * n + b * kv * n * dh,
                bwd_other=10 * b * h * u * n + 2 * b * kv * n * dh)
    Cq = sp.Min(MEASURE_CHUNK, n)  # queries measured at once
    ks = b * kv * Cq * u * dh * by  # the workspace of their sampled keys [b, kv, C U, dh]
    sc = b * h * Cq * u * by  # of their scores
    idx = 8 * n * u
    top = 8 * b * h * u
    qt = b * h * u * dh * by
    lse = LSE_BYTES * b * h * u
    o = b * h * n * dh * by  # the mean written to every row, the active ones scattered
    qkv = q + 2 * kvb
    # SDPA's gathered q, k and v (q_proj's, k_proj's views), output and logsumexp; the gather's index; the scattered
    # output and o_proj's copy of it
    saved = 2 * q + 2 * kvb + 2 * qt + lse + top + pos.saved
    # the sample's hash [n, U]; the workspaces, M [b, h, n], a chunk's queries folded (a copy), its max and sum
    qc = 0 if rotates(env) and kv == h else b * h * Cq * dh * by  # rope's contiguous q, one head a group: a view
    phases = [qkv + 2 * idx + ks + sc + b * h * n * by + qc + 2 * b * h * Cq * by,
              qkv + qt + 2 * qt + lse + top,  # SDPA of the active queries
              qkv + o + q + out]  # the scatter, at o_proj
    if env.pos is not None:
        phases.append(qkv + pos.peak)
    # the backward: the gradients of the scatter's two inputs and of SDPA's q (grouped K/V heads: SDPA's gradients
    # of k, v reduced in place of q's)
    bwd = [2 * q + 2 * qt if kv == h else q + qt]
    return attention_cost(p, s, h, kv, dh, measure + core, pos, saved, phases, cache=0, bwd_phases=bwd)
