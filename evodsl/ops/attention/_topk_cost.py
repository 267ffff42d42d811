"""The cost of mha(topk) (topk.py): the projections, the selection (query chunks of C against their keys, without
autograd), each query's k selected keys and values gathered, and one SDPA call of n rows against k keys each."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import LSE_BYTES, attention_cost, head_symbols, position_cost, rotates
from ._sigmoid_cost import sigmoid_pairs


def topk_cost(p, env: OpEnv, s: Symbols) -> Cost:
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    C, k = s.sym("C", p.chunk), s.sym("k", p.k)
    pos = position_cost(env, s, h, kv, dh)
    pairs = sigmoid_pairs(s, C, env.causal)  # the scored (query, key) pairs: causal, each chunk up to its end
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    select = Cost(fwd=2 * b * h * pairs * dh, fwd_other=2 * b * h * pairs)
    core = Cost(fwd=4 * b * h * n * k * dh, bwd=10 * b * h * n * k * dh, fwd_other=5 * b * h * n * k,
                bwd_other=10 * b * h * n * k)
    g = b * h * n * k * dh * by  # one of the gathered keys, values [b, h, n, k, dh]
    lse = LSE_BYTES * b * h * n
    idx, keep = 8 * b * h * n * k, b * h * n * k
    fmask = b * h * n * k * by  # SDPA's float copy of the bool mask
    rot = rotates(env)
    # SDPA's rows [b h, n, 1, dh]: a copy of q (a view at b = 1, or of rope's contiguous q); the kernel lays o out
    # like them, so o_proj copies it unless they are q_proj's output itself (b = 1, no rope)
    qc = 0 if rot else q * sp.Min(1, b - 1)
    o_copy = q if rot else qc
    qkv = q + 2 * kvb
    saved = 2 * q + o_copy + 2 * g + lse + fmask + idx + pos.saved  # SDPA's q (rows), o, gathered k, v, logsumexp,
    # mask; the gathers' index; o_proj's copy of o
    phases = [qkv + _selection(s, C, k, h, kv, dh, env.causal, rot),
              qkv + idx + keep + 2 * g,  # the keys and values gathered
              qkv + keep + 2 * g + qc + fmask + q + lse,  # SDPA (the index released)
              qkv + q + o_copy + out]  # at o_proj
    if env.pos is not None:
        phases.append(qkv + pos.peak)
    bwd = [2 * g + 2 * q - (q if rot else qc)]  # the gradients of q and of the gathered k, v
    return attention_cost(p, s, h, kv, dh, select + core, pos, saved, phases, cache=2 * kvb, bwd_phases=bwd)


def _selection(s: Symbols, C, k, h, kv, dh, causal: bool, rot: bool):
    """The selection's live bytes beside q, k, v: the scores' workspace [b, h, C, n] (allocated once), k made
    contiguous (not rope's, which is), one chunk's queries folded [b kv, g C, dh], the causal [C, C] mask, a chunk's
    top k (values, int64 indices, bool and its negation) and its -inf columns (a chunk with fewer than k keys: the
    first causal chunk when C < k, every chunk when n < k), the selection's [b, h, n, k] outputs when chunked."""
    b, n, by = s.b, s.n, s.bytes
    Cq = sp.Min(C, n)
    ws = b * h * Cq * n * by + (0 if rot else b * n * kv * dh * by) + b * h * Cq * dh * by
    tri = Cq ** 2 if causal else 0
    top = b * h * Cq * k * (by + 10)
    pad = sp.Piecewise((b * h * Cq * k * by, (Cq < k) if causal else (n < k)), (0, True))  # the padded copy [C, k]
    return ws + tri + top + pad + sp.Piecewise((b * h * n * k * 9, C < n), (0, True))
