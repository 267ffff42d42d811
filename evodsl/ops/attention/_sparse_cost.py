"""The cost of mha(sparse) (sparse.py): the blocked form's matmuls, copies and phases, held to measurement in
tests/ops/test_cost_attention.py; l >= n runs one SDPA call (_band_cost.one_call_cost)."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._band_cost import one_call_cost, with_one_call
from ._common import AttentionParams, attention_cost, head_symbols, position_cost, rotates


def sparse_cost(p: AttentionParams, env: OpEnv, s: Symbols) -> Cost:
    """Blocks of l (l clipped to n, nb = ceil(n / l), N = nb l): the scores [b, h, N, W], W = P l + nb (strided,
    P = 2 blocks of band causal, 3 bidirectional) or l + c nb (fixed), computed by matmuls (2 N W dh each way)
    and one softmax. The grids of q, k, v are copies (padded to N; a contiguous q or k, rotated or repeated for
    grouped K/V heads, is used in place when nothing is padded); strided copies the band's keys and values (P
    blocks each, from a padded copy) and the class layouts of q, k, v; fixed the summary keys and values."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    pos = position_cost(env, s, h, kv, dh)
    l = sp.Min(s.sym("l", p.stride), n)
    nb = sp.ceiling(n / l)
    N = nb * l
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    grouped = int(kv != h)
    base = q + 2 * kvb + (2 * q if grouped else 0)
    G = b * h * N * dh * by  # a grid
    padded = sp.Min(1, N - n)
    contiguous_qk = 1 if rotates(env) else 0
    new = [1 - (1 - padded) * contiguous_qk, 1 - (1 - padded) * max(contiguous_qk, grouped),
           1 - (1 - padded) * grouped]  # is the grid of q, k, v a new tensor?
    grids = sum(new) * G
    if p.pattern == "strided":
        P = 2 if env.causal else 3
        W = P * l + nb
        near = b * h * N * P * l * by
        S = b * h * N * W * by
        cls = b * h * l * nb ** 2 * by  # a class's scores (and the copy of its weights)
        gp = b * h * (nb + P - 1) * l * dh * by  # the padded blocks the band is cut from
        several = sp.Min(1, nb - 1)  # one block: the class layouts are q, k, v themselves
        kept = 2 * P * G + (1 + 3 * several) * G + cls  # q, the band's keys and values, q, k, v in class layout,
        # the class weights
        phases = [base + grids + gp + P * G, base + grids + P * G + near, base + grids + near + 2 * several * G + cls,
                  base + new[2] * G + S + gp + P * G, base + new[2] * G + S + 3 * G + cls]
        mask = 16 * N * sp.Max(P * l, nb) + 2 * N * W  # building the mask: int64 t - r and its |.| or remainder
        bwd = [near + P * G, S]  # the gradients of the band's weights and of its values; of all the weights
    else:
        c = sp.Min(s.sym("c", p.c), l)
        W = l + c * nb
        S = b * h * N * W * by
        summ = b * h * nb * c * dh * by  # the summary keys (or values): a copy
        kept = 3 * G + 2 * summ
        phases = [base + grids + 2 * summ + S, base + new[2] * G + summ + S + 3 * G]
        mask = 3 * N * W + summ  # building the mask: bools
        bwd = [G + S, 2 * S - q, 2 * G]  # measured phases: at the weights' gradients, the softmax's backward
        # (o_proj's copy released), the gradients of q and k
    M = N * W  # the bool mask
    phases += [base + new[2] * G + S + mask,  # the mask built
               base + new[2] * G + 2 * S + M,  # the scores joined
               q + 2 * kvb + G + q + out]  # at o_proj
    if env.pos is not None:
        phases.append(q + 2 * kvb + pos.peak)
    flops = 2 * b * h * N * W * dh
    core = Cost(fwd=2 * flops, bwd=4 * flops, fwd_other=7 * S / by, bwd_other=14 * S / by)
    dropped = 2 * S if p.dropout > 0 else 0  # the dropped weights and dropout's float noise (CPU)
    saved = kept + M + S + dropped + q + pos.saved  # and o_proj's copy of the output
    cache = 2 * b * n * kv * dh * by
    blocked = attention_cost(p, s, h, kv, dh, core, pos, saved, phases, cache, bwd_phases=bwd)
    single = one_call_cost(p, env, s, None, cache, causal=env.causal)  # l >= n: one SDPA call
    lo = s.sym("l", p.stride) - 1
    return with_one_call(blocked, single, n, lo, 0 if env.causal else lo)
