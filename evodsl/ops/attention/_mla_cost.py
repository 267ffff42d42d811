"""The cost of mha(mla) (mla.py): the forward torch runs (the latent up-projected, one fused SDPA call over heads of
width E = max(nope + rope, v), the narrower side zero-padded), held to measurement in tests/ops/test_cost_attention.py.
The decoding state is the latent and the shared rotary key: kv_rank + rope_dim numbers per token."""
from __future__ import annotations

from types import SimpleNamespace

import sympy as sp

from ..cost import Cost, Symbols, linear
from ..norm import rmsnorm
from ..registry import OpEnv
from ._common import LSE_BYTES, rotates


def _norm(s: Symbols, width) -> Cost:
    """The latents' RMSNorm over `width` channels: norm(rmsnorm)'s own formulas, its input counted as kept."""
    c = rmsnorm.cost(rmsnorm.RMSNormParams(), None, SimpleNamespace(b=s.b, n=s.n, d=width, bytes=s.bytes))
    return Cost(params=c.params, fwd_other=c.fwd_other, bwd_other=c.bwd_other, saved=c.saved)


def mla_cost(p, env: OpEnv, s: Symbols) -> Cost:
    """Projections: q (W_q, or W_dq, its RMSNorm and W_uq), kv_down (W_dkv and W_kr), the latent's RMSNorm, kv_up
    (W_uk and W_uv), o_proj; SDPA over [b, h, n, n] scores of width E (4 b h n^2 E forward, 2.5x backward: the
    fused kernel). Kept for backward: the norms' inputs (kv_down's whole output, as the latent is a slice of it)
    and their x·rstd, rstd; kv_up's (W_uq's) input; SDPA's q, k, v (v padded, or the slice of kv_up's output it
    is), output and logsumexp; o_proj's copy of the heads; rope's cos and sin. Every intermediate lives until the
    output: the inference peak is their sum at o_proj (kv_down's output freed once k^R is rotated)."""
    b, n, by = s.b, s.n, s.bytes
    h, r, R = s.sym("h", p.heads), s.sym("kv_rank", p.kv_rank), s.sym("rope", p.rope_dim)
    c, dv = s.sym("nope", p.nope_dim), s.sym("dv", p.v_dim)
    E = c + R if p.nope_dim + p.rope_dim >= p.v_dim else dv  # SDPA's head width
    tokens = b * n
    if p.q_rank:
        rq = s.sym("q_rank", p.q_rank)
        qnorm = _norm(s, rq)
        proj = linear(s, s.d, rq, p.bias) + qnorm + linear(s, rq, h * (c + R), False)
        q_kept = tokens * rq * by * 2 + qnorm.saved  # W_dq's output (the norm's input), W_uq's input
    else:
        proj = linear(s, s.d, h * (c + R), p.bias)
        q_kept = 0
    norm = _norm(s, r)
    proj = (proj + linear(s, s.d, r + R, p.bias) + norm + linear(s, r, h * (c + dv), False)
            + linear(s, h * dv, s.d, p.bias))
    scores = b * h * n ** 2
    core = Cost(fwd=4 * scores * E, bwd=10 * scores * E, fwd_other=5 * scores, bwd_other=10 * scores)
    pos = Cost()
    if env.pos is not None:
        pos = env.pos[0].attach_cost(env.pos[1], s, h, 1, R)  # q's rope channels and the one shared key
        pos = Cost(fwd_other=pos.fwd_other, bwd_other=pos.bwd_other, saved=pos.saved)
    qE = b * h * n * E * by  # SDPA's q, k, v and output
    Q = tokens * h * (c + R) * by  # the projected queries
    kvd, lat, kv = tokens * (r + R) * by, tokens * r * by, tokens * h * (c + dv) * by  # kv_down's, the latent, kv_up's
    copy = tokens * h * dv * by  # o_proj's input: the heads laid out [b, n, h dv]
    padded_v = p.v_dim < p.nope_dim + p.rope_dim
    lse = LSE_BYTES * b * h * n
    saved = q_kept + kvd + norm.saved + lat + 3 * qE + (qE if padded_v else kv) + lse + copy + pos.saved
    turned = b * h * n * R * by + tokens * R * by if rotates(env) else 0  # q^R, k^R rotated
    peak = Q + (0 if rotates(env) else kvd) + lat + kv + 3 * qE + (qE if padded_v else 0) + copy + turned
    # backward's peak, in SDPA's: o's gradient (zero-padded, or o_proj's input's viewed) and those of q, k, v,
    # o_proj's copy released
    bwd_peak = 3 * qE + (qE if padded_v else copy) - copy
    total = proj + core + pos
    return Cost(params=total.params, fwd=total.fwd, fwd_other=total.fwd_other, bwd=total.bwd,
                bwd_other=total.bwd_other, saved=saved, saves_input=True, peak=peak,
                cache=b * n * (r + R) * by, bwd_peak=sp.sympify(bwd_peak))
