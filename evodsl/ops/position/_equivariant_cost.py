"""The cost of mha(linear) with pos(equivariant_kernel) inside (_equivariant_attention.py), symbols as
attention/_common.py's; F = dh features a head (elu + 1), e = dv + 1 (the values and the denominator's column of
ones). The kernel (phi(K)^T [V 1], phi(Q) times it; causal, in chunks of 64) is _kernelized.kernel_cost's on
F' features:

- rotation: F' = F + 2m + 1, the features [phi(q) u_i R rho] and [phi(k) u_j 1] concatenated (copies), the
  position features [h, n, 2m] and [n, 2m] made per call;
- clipped: F' = F, plus phi(q) phi(r)^T [b, h, n, 2k + 1] (W = 2k + 1 columns read; causal k + 1), the [v 1] rows
  and their prefix sums [n + 1], the gather of W rows a query [b, h, n, W, e] and its matmul, the far keys' one
  (causal) or two prefix-sum terms. O(n (F + k) e) time and memory, never n x n.

Memory from the measured traces: the features stay alive until the attention returns (they are attend()'s
locals), so the last phase holds them beside the division and o_proj's copy; clipped, the gather's phase
(every term above at once) leads the inference peak.
"""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols


def equivariant_attention_cost(p, env, s: Symbols) -> Cost:
    from ..attention import _kernelized as kern
    from ..attention._common import attention_cost, head_symbols
    from ..attention.linear import LinearAttention

    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    pos = env.pos[1]
    grouped = p.kv_heads not in (None, p.heads)
    e = dh + 1
    q, kvb = b * n * h * dh * by, b * n * kv * dh * by
    rotation = pos.method == "rotation"
    m = s.sym("m", pos.scales) if rotation else 0
    f = dh + 2 * m + 1 if rotation else dh
    fq, fk = b * h * n * f * by, b * kv * n * f * by
    kernel = kern.kernel_cost(s, env, h, kv, dh, f, fq, fk, grouped, LinearAttention.chunk, positive=False)
    flops = kernel.flops
    out = b * n * s.d * by
    E = b * h * n * e * by  # [num den] at the query heads
    # kept: phi's inputs (q, k); the features the kernel reads as they are (causal: only unpadded, and phi(k) only
    # where its K/V heads are the query heads: else the kernel keeps its repeated copy)
    read = fq + fk
    if env.causal:
        c = sp.Min(LinearAttention.chunk, n)
        read = (fq + (0 if grouped else fk)) * (1 - sp.Min(1, sp.ceiling(n / c) * c - n))
    saved = q + kvb + read + kernel.saved
    # at o_proj: v and the features (alive until the attention returns), [num den], the division and its copy
    last = kvb + fq + fk + E + 2 * q + out
    if rotation:
        params = Cost(params=m + 2 * h * m)
        small = h * n * 2 * m * by + n * 2 * m * by + h * by  # u_i R [h, n, 2m], u [n, 2m], rho
        phases = [ph + small for ph in kernel.phases] + [last + small]
        cache = b * kv * f * e * by
    else:
        K = s.sym("k", pos.clip)
        W = K + 1 if env.causal else 2 * K + 1  # the inner offsets a query reads
        params = Cost(params=h * (2 * K + 1) * dh)
        rel = 2 * b * h * n * (2 * K + 1) * dh + 2 * b * h * n * W * e
        flops = flops + Cost(fwd=rel, bwd=2 * rel)
        C, Cw = b * h * n * (2 * K + 1) * by, b * h * n * W * by  # phi(q) phi(r)^T, its inside columns
        G = b * h * n * W * e * by  # the gathered rows
        rows = b * h * n * e * by + b * h * (n + 1) * e * by + (b * kv * n * e * by if grouped else 0)  # [v 1], P
        index = n * W * (by + 8) + 8 * n
        # kept: phi(q) phi(r)^T and its inside columns, the gathered rows, the far keys' sums (one a side)
        saved = saved + C + Cw + G + (1 if env.causal else 2) * E
        phases = [*kernel.phases, kvb + fq + fk + 2 * E + C + Cw + rows + G + index, last + C + q]
        cache = b * kv * f * e * by + b * kv * (K + 1) * e * by  # the state, the window of k and the far sum
    # backward: the kernel's, its features repeated to the query heads before it (as when they are not grouped),
    # at the content features' width (rotation: the concatenation's backward hands phi(q) its slice); clipped, the
    # gathered rows' gradient [b, h, n, W, e] once [num den]'s gradient (bidirectional: and the inside columns')
    # is released
    bwd = kern.kernel_cost(s, env, h, kv, dh, dh, fq, fk, False, LinearAttention.chunk, positive=False).bwd_phases
    if not rotation:
        bwd = [*bwd, G - E - (0 if env.causal else Cw)]
    return attention_cost(p, s, h, kv, dh, flops, params, saved, phases, cache=cache, bwd_phases=bwd)
