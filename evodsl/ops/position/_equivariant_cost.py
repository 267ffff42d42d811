"""The cost of mha(linear) with pos(equivariant_kernel) inside (_equivariant_attention.py), symbols as
attention/_common.py's; F = dh features a head (elu + 1), e = dv + 1 (the values and the denominator's column of
ones). The kernel (phi(K)^T [V 1], phi(Q) times it; causal, in chunks of 64) is _kernelized.kernel_cost's on
F' features:

- rotation: F' = F + 2m + 1, the features [phi(q) u_i R rho] and [phi(k) u_j 1] concatenated (copies), the
  position features [h, n, 2m] / [n, 2m] made per call;
- clipped: F' = F, plus phi(q) phi(r)^T [b, h, n, W] (W = 2k + 1; causal k + 1 of them read), the [v 1] rows
  padded by k (either side) and their prefix sums, the gather of W rows a query [b, h, n, W, e] and its matmul,
  the far keys' two (causal: one) prefix-sum terms.
"""
from __future__ import annotations

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
    # phi's inputs and outputs (q, k)
    saved = q + kvb + fq + fk + kernel.saved
    extra = 0
    if rotation:
        params = Cost(params=m + 2 * h * m)
        # phi(q), phi(k) before the concatenation; the position features
        extra = q + kvb + h * n * 2 * m * by + n * (2 * m + 1) * by
    else:
        K = s.sym("k", pos.clip)
        W = K + 1 if env.causal else 2 * K + 1
        params = Cost(params=h * (2 * K + 1) * dh)
        rel = 2 * b * h * n * (2 * K + 1) * dh + 2 * b * h * n * W * e
        flops = flops + Cost(fwd=rel, bwd=2 * rel)
        rows = b * h * n * W * e * by
        extra = b * h * n * (2 * K + 1) * by + rows + 2 * b * kv * (n + 2 * K) * e * by
        saved = saved + extra
    phases = [*(ph + extra for ph in kernel.phases)]
    cache = b * kv * f * e * by + (0 if rotation else b * kv * (K + 1) * e * by)
    return attention_cost(p, s, h, kv, dh, flops, params, saved, phases, cache=cache,
                          bwd_phases=kernel.bwd_phases)
