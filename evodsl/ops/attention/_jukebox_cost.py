"""The cost of mha(jukebox) (jukebox.py): one SDPA call over the folded sequence, held to measurement in
tests/ops/test_cost_attention.py."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import LSE_BYTES, AttentionParams, attention_cost, head_symbols


def jukebox_cost(p: AttentionParams, env: OpEnv, s: Symbols) -> Cost:
    """Rows of l (clipped to n), nr = ceil(n / l), N = nr l. Scores: b h N l (row, prev_row: each query against a
    row), b h N nr (column: against a column). The grids the kernel reads: q, k, v [b, N, heads, dh] (views of
    the projections, or zero-padded copies where l does not divide n), prev_row's shifted k and v (always
    copies), column's transposed q, k, v (copies). The fused kernel keeps them, its output O (row layout for
    row and prev_row, which o_proj reads in place; column's is transposed back, a copy R) and its logsumexp.
    With several sequences and padding, o_proj's input (O or R cut to n) is not contiguous: linear copies it.
    Bidirectional and padded, row and column pass the last row's padding as a mask (bool, and a float copy)."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    pattern = p.pattern
    l = sp.Min(s.sym("l", p.block), n)
    nr = sp.ceiling(n / l)
    N = nr * l
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    Q, K = b * N * h * dh * by, b * N * kv * dh * by  # the grids (= q, kvb where l divides n)
    padded, many = sp.Min(1, N - n), sp.Min(1, b - 1)
    lse = LSE_BYTES * b * h * N
    scores = b * h * N * (nr if pattern == "column" else l)
    masked = padded if (pattern != "prev_row" and not env.causal) else 0
    maskf = masked * 4 * b * N  # the float mask SDPA makes of the bool one
    mask_peak = masked * (5 + (many if pattern == "column" else 0)) * b * N
    cut = padded * many * q  # linear's copy of its input cut to n
    if pattern == "column":
        grids_new = Q + 2 * K  # the transposed grids
        several = sp.Min(1, nr - 1)  # one row: O transposed back is O itself
        lin = several * (Q - padded * many * (Q - q))  # what o_proj keeps: R (in place) or its copy of R cut to n
        at_o_proj = Q + cut  # R (O released; one row: O itself), and the cut copy
    else:
        grids_new = padded * Q + (2 * K if pattern == "prev_row" else padded * 2 * K)
        lin = cut
        at_o_proj = Q + cut
    qkv = q + 2 * kvb
    if p.dropout > 0:  # training runs SDPA's math kernel (float32): q scaled, k and v at h heads, the weights,
        # their dropout mask and the dropped weights; its output [.., h, L, dh] is copied for o_proj
        f32 = max(by, 4)
        core = Cost(fwd=4 * scores * dh, bwd=8 * scores * dh, fwd_other=5 * scores, bwd_other=10 * scores)
        saved = (3 * b * N * h * dh + 3 * scores) * f32 + Q - padded * many * (Q - q)
        bwd = [Q + scores * f32]
    else:
        core = Cost(fwd=4 * scores * dh, bwd=10 * scores * dh, fwd_other=5 * scores, bwd_other=10 * scores)
        saved = Q + 2 * K + Q + lse + lin + maskf  # the grids, O, its logsumexp, o_proj's input
        # backward: o's gradient in the grid's layout beside those of the grids, o_proj's input released
        bwd = [Q + Q + 2 * K - lin]
    phases = [qkv + grids_new + Q + lse + mask_peak,  # the call
              qkv + at_o_proj + out]  # at o_proj
    if pattern == "column":
        phases.append(qkv + 2 * Q)  # O transposed back into R
    cache = {"row": sp.Mod(n, s.sym("l", p.block)), "column": n,
             "prev_row": sp.Min(n, s.sym("l", p.block) + sp.Mod(n, s.sym("l", p.block)))}[pattern]
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=2 * b * cache * kv * dh * by,
                          bwd_phases=bwd)
