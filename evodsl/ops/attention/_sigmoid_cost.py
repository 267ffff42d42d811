"""The cost of mha(sigmoid) (sigmoid.py, _sigmoid_kernel.py): the projections, then the blocked kernel, query
blocks of B (Bq = min(B, n) rows) against key blocks of B; its export's dense form is not costed
(tests/test_onnx.py CAUSAL_GROUPS)."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import attention_cost, head_symbols, position_cost, score_bias


def sigmoid_pairs(s: Symbols, B, causal: bool):
    """The (query, key) pairs the kernel scores: every one; causal, the lower triangle's blocks whole (query block
    i reads the keys up to its end: B^2 m (m - 1) / 2 for the m - 1 full blocks, then the last block's r rows
    against all n keys)."""
    n = s.n
    if not causal:
        return n ** 2
    m = sp.ceiling(n / B)
    return B ** 2 * m * (m - 1) / 2 + (n - (m - 1) * B) * n


def sigmoid_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """FLOPs: q k^T and p v over the scored pairs forward (4 per pair and channel), the backward recomputing the
    scores and running four more products (10). Kept: q, k, v (the Function's) and o, o_proj's input (laid out
    [b, n, h, dh]: no copy). The kernel's workspace, allocated once per call (one query block of all heads, QB; one
    key block, KB; one block of weights, S): forward, the query block, its sum and a product (3 QB), the key and
    value blocks (2 KB), the weights; backward, the query and output-gradient blocks, dq's sum and a product (4 QB),
    the key and value blocks and a key block's gradient (3 KB), the weights and dS. Beside it, ALiBi's distances
    [Bq, Bk] and bias [h, Bq, Bk], and a diagonal block's causal mask (int64 positions, bool [Bq, Bq])."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    B = s.sym("B", p.block)
    Bq = sp.Min(B, n)
    alibi = score_bias(env)
    pos = Cost() if alibi or env.pos is None else position_cost(env, s, h, kv, dh)
    pairs = sigmoid_pairs(s, B, env.causal)
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    qkv = q + 2 * kvb
    QB, KB, S = b * h * Bq * dh * by, b * kv * Bq * dh * by, b * h * Bq ** 2 * by
    extra = (Bq ** 2 * by + h * Bq ** 2 * by if alibi else 0) + (2 * 8 * Bq + Bq ** 2 if env.causal else 0)
    per_pair = 6 + (2 if alibi else 0)  # scale, b, (the bias,) sigmoid (3), masks
    core = Cost(fwd=4 * b * h * pairs * dh, bwd=10 * b * h * pairs * dh, fwd_other=per_pair * b * h * pairs,
                bwd_other=2 * per_pair * b * h * pairs + 3 * b * h * pairs)
    saved = qkv + q + pos.saved
    phases = [qkv + q + 3 * QB + 2 * KB + S + extra,  # the blocks
              qkv + q + out]  # at o_proj
    if env.pos is not None and not alibi:
        phases.append(qkv + pos.peak)
    # backward: dq, dk, dv and o's gradient (o_proj's input released) beside the workspace
    bwd = [q + 2 * kvb + 4 * QB + 3 * KB + 2 * S + extra]
    return attention_cost(p, s, h, kv, dh, core, pos, saved, phases, cache=2 * kvb, bwd_phases=bwd)
