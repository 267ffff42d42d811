"""The cost of mha(mgk) (mgk.py): the projections (r key projections), then one fused SDPA call over the n r
(token, component) pairs, width dh + 1."""
from __future__ import annotations

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..registry import OpEnv
from . import _kernelized as kern
from ._common import LSE_BYTES, attention_cost, head_symbols


def mgk_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """SDPA over [b, h, n R, n r] scores of width E = dh + 1 (R = r causal: the queries repeated r times under
    is_causal, the rows between dropped; R = 1 bidirectional): 4 B K E forward, 2.5x backward (the fused kernel);
    softmax 5 FLOPs a score. Bytes: q' [b, n, h, E] (and its r-fold repeat, causal), k' [b, kv, n r, E] (built from
    the r keys [b, n, r, kv, dh], which |k|^2's product keeps), v' [b, n, kv, E] and its r-fold repeat; SDPA keeps its
    q, k', the repeat, its output ([b, h, n R, E]) and logsumexp; o_proj a copy of the kept rows' dh columns."""
    if p.form == "linear":
        return mgk_linear_cost(p, env, s)
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    r = s.sym("r", p.components)
    R = r if env.causal else 1
    E = dh + 1
    extra = linear(s, s.d, (r - 1) * kv * dh, p.bias) + Cost(params=kv * r)
    scores = b * h * n * R * n * r
    core = Cost(fwd=4 * scores * E, bwd=10 * scores * E, fwd_other=5 * scores + 4 * b * n * r * kv * dh,
                bwd_other=10 * scores + 8 * b * n * r * kv * dh)
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    qe, ke, ve = b * n * h * E * by, r * b * n * kv * E * by, b * n * kv * E * by
    qrep = r * qe if env.causal and p.components > 1 else 0  # the repeated queries
    lse = LSE_BYTES * b * h * n * R
    saved = r * kvb + (qrep or qe) + ke + r * ve + R * qe + lse + q + kv * r * 4
    phases = [q + 2 * r * kvb,  # the r keys and their squares
              q + r * kvb + ke + b * kv * n * r * by,  # k' joined with its column
              qe + qrep + ke + ve + r * ve + R * qe + lse,  # SDPA
              qe + qrep + ke + ve + R * qe + q + out]  # at o_proj
    bwd = [2 * R * qe + ke + r * ve - q]  # SDPA's gradients (and its output's) beside each other, o_proj's copy released
    return attention_cost(p, s, h, kv, dh, extra + core, Cost(), saved, phases,
                          cache=b * n * kv * (r + 1) * E * by, bwd_phases=bwd,
                          projections_bwd=q + 3 * out - saved + r * kvb)  # the r keys (|k|^2's) not yet released


def mgk_linear_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """form=linear (_mgk_linear.py): the r key projections; phi(q) = elu(q) + 1; the r keys joined ([b, n, r, kv,
    dh], a copy), their features and the mixture sum_r pi_r phi(k_jr) (one matmul with pi: 2 n r dh a K/V head);
    then the feature kernel on F = dh features (_kernelized.kernel_cost: one [S z] bidirectional, chunks causal)."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    r = s.sym("r", p.components)
    q, kvb = b * n * h * dh * by, b * n * kv * dh * by
    grouped = p.kv_heads not in (None, p.heads)
    extra = linear(s, s.d, (r - 1) * kv * dh, p.bias) + Cost(params=kv * r)
    feat = Cost(fwd_other=2 * b * n * (h + 3 * r * kv) * dh, bwd_other=4 * b * n * (h + 3 * r * kv) * dh)
    fq, fk = q, kvb
    kernel = kern.kernel_cost(s, env, h, kv, dh, dh, fq, fk, grouped, 64, positive=False)
    # kept: q (elu's input), the r keys joined (elu's), their features (the product's), beside the kernel's, and
    # phi(q) and phi~(k) where the kernel reads them uncopied (causal: unpadded, phi~(k) not repeated to the heads)
    if env.causal:
        c = sp.Min(64, n)
        whole = 1 - sp.Min(1, sp.ceiling(n / c) * c - n)  # 1 where n is a multiple of the chunks
        own = whole * (fq + (0 if grouped else fk))
        # backward: phi(q)'s gradient through the states is not a second one where its chunks are views of it
        bwd = [*kernel.bwd_phases[:2], kernel.bwd_phases[2] - whole * fq, *kernel.bwd_phases[3:]]
    else:
        own, bwd = fq + fk, kernel.bwd_phases
    saved = q + 2 * r * kvb + own + kernel.saved
    building = [fq + 3 * r * kvb]  # the r keys, their features and their product with pi
    return attention_cost(p, s, h, kv, dh, extra + feat + kernel.flops, Cost(), saved, [*building, *kernel.phases],
                          cache=b * kv * dh * (dh + 1) * by, bwd_phases=bwd,
                          # the r keys' gradient beside their features' (elu's backward)
                          projections_bwd=q + 3 * b * n * s.d * by - saved + 2 * r * kvb)
