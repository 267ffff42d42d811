"""The cost of mha(routing) (routing.py): the routing, the gathered key slots, one SDPA call."""
from __future__ import annotations

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import attention_cost, head_symbols


def routing_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """The projections; q^ and k^ against the k centroids ([b, h, n, k] each, no gradient); w slots a query (those
    past the sequence masked; bidirectional: the top-w of the similarities padded by w) and its own key, gathered ([b, h, n, W + 1, dh] keys and values) and read by
    SDPA (the fused kernel, b h n queries of one row each); in training the centroids' update (the one-hot sums of
    q^ and k^). Balanced clusters: every query reads W keys, whatever the routing: n W dh."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    k, w = s.sym("k", p.clusters), s.sym("w", p.window)
    W = w  # slots a query (past the sequence: masked)
    bhn = b * h * n
    routing = 4 * bhn * dh * k
    scores = bhn * (W + 1)
    update = 4 * bhn * k * dh
    core = Cost(fwd=routing + 4 * scores * dh + update, fwd_inference=routing + 4 * scores * dh, bwd=10 * scores * dh,
                fwd_other=5 * scores + 8 * bhn * dh + 2 * bhn * k, bwd_other=10 * scores)
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    kvh = q if kv != h else kvb  # K and V as the query heads read them (grouped ones repeated)
    G = scores * dh * by  # the gathered keys; values
    slots = 8 * scores  # int64 slot indices (with the own key's)
    bias = scores * by  # the additive mask
    lse = 4 * bhn  # SDPA's float32 logsumexp, one per query
    # kept: the gathers' sources (K, V) and index, SDPA's q (a contiguous copy), keys, values, mask, output and
    # logsumexp, o_proj's input
    saved = 2 * kvh + slots + q + 2 * G + bias + q + lse + q
    # at o_proj: q, K, V; the routing's similarities and query clusters; the slot indices, their validity and the
    # own keys' positions; the gathered keys and values, the mask; SDPA's output and o_proj's input
    phases = [q + 2 * kvh + 2 * bhn * k * by + 8 * bhn + 8 * bhn * W + bhn * W + 8 * n + slots + 2 * G + bias
              + 2 * q + out]
    # backward: SDPA's gradients of q and of the gathered keys and values (o_proj's input released)
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=2 * kvb, bwd_phases=[q + 2 * G])
