"""mha(adaptive_span): every head learns how far back it looks (Sukhbaatar et al. 2019).

Head h has a learned span z_h = S * clamp(p_h, 0, 1) (S = max_span, p_h a parameter initialised to
span_init) and a soft mask over the distance x between query and key, with ramp length R:

    m_z(x) = clamp((R + z - x) / R, 0, 1)
    a_tr   = m_z(x_tr) exp(s_tr) / sum_{q in W(t)} m_z(x_tq) exp(s_tq),   s_tr = q_t . k_r / sqrt(dh)
    o_t    = sum_{r in W(t)} a_tr v_r
    causal:        W(t) = {r : t-S+1 <= r <= t},  x_tr = t - r      (distances 0 .. S-1)
    bidirectional: W(t) = {r : |t-r| < S},        x_tr = |t - r|

clipped to 0 .. n-1 (with ALiBi, its bias is added to s_tr). It is computed exactly as softmax over the
band of s_tr + log m_z(x_tr), with log 0 = -inf, by the O(n * S) banded kernel (_banded.py). Keys with
x >= R + z_h have m = 0 for every head, so outside tracing the band is cut to distance floor(R + max_h z_h):
the cost shrinks with the learned spans, as in the paper, and the result and gradients are unchanged.

The spans are trained by the model's loss plus `aux_loss()` = penalty * mean_h z_h (the paper's
lambda / M * sum_i z_i over this layer's M heads); the model's aux_loss() sums those of its modules.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost, Symbols
from ..registry import Op, OpEnv, ShapeProblem, register
from ._banded import BandBias, banded_attention, banded_attention_cost
from ._common import AttentionBase, AttentionParams, attention_shape


class AdaptiveSpanAttentionParams(AttentionParams):
    R: int = Field(32, ge=1, description="ramp length of the soft mask m_z")
    max_span: int = Field(1024, ge=1, description="S: the longest span a head can learn (keys it may see)")
    span_init: float = Field(0.0, ge=0.0, le=1.0, description="initial span z / S of every head")
    penalty: float = Field(2e-6, ge=0.0, description="lambda: aux loss lambda * mean_h z_h")


def adaptive_span_shape(p: AdaptiveSpanAttentionParams, env: OpEnv):
    shape = attention_shape(p, env)
    if p.R > p.max_span:
        raise ShapeProblem(f"ramp R={p.R} is longer than max_span={p.max_span}", "R",
                           f"the soft mask ramps over R of the max_span={p.max_span} keys: use "
                           f"R <= {p.max_span} (the paper: R=32, max_span 8192)")
    return shape


class AdaptiveSpanAttention(AttentionBase):
    def __init__(self, p: AdaptiveSpanAttentionParams, env: OpEnv):
        super().__init__(p, env)
        self.R, self.max_span, self.penalty = p.R, p.max_span, p.penalty
        self.span = nn.Parameter(torch.full((self.heads,), float(p.span_init)))  # p_h; z_h = S clamp(p_h)

    def spans(self) -> torch.Tensor:
        """z [heads]: the current span of every head, in positions."""
        return self.max_span * self.span.clamp(0.0, 1.0)

    def aux_loss(self) -> torch.Tensor:
        """The span penalty, penalty * mean_h z_h."""
        return self.penalty * self.spans().mean()

    def _reach(self, z: torch.Tensor) -> int:
        """Largest distance with m_z > 0 for some head (x < R + z); S - 1 when z has no value to read
        (tracing, compiling or exporting: static shapes; meta tensors)."""
        if torch.jit.is_tracing() or torch.compiler.is_compiling() or z.is_meta:
            return self.max_span - 1
        return min(self.max_span - 1, math.floor(self.R + z.detach().max().item()))

    def _log_mask(self, z: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """log m_z(x) [h, *x] for the distances x of positions i, j (-inf where m = 0)."""
        dist = i - j if self.causal else (i - j).abs()
        m = ((self.R + z.view(-1, *(1,) * dist.dim()) - dist) / self.R).clamp(max=1.0)  # [h, *dist]
        pos = m > 0
        return torch.where(pos, torch.where(pos, m, 1.0).log(), float("-inf"))  # no 0 * inf in grads

    def forward(self, x, ctx):
        if ctx is not None and ctx.cache is not None:  # decoding: the last S positions' K/V
            z = self.spans().to(self.q_proj.weight.dtype)
            return self.window_step(x, ctx, self.max_span, lambda i, j: self._log_mask(z, i, j))
        q, k, v = self.qkv(x)
        z = self.spans().to(q.dtype)

        def bias(i, j):  # the soft mask written out here, as its cost counts it (ALiBi's built beside it)
            dist = i - j if self.causal else (i - j).abs()
            m = ((self.R + z.view(-1, *(1,) * dist.dim()) - dist) / self.R).clamp(max=1.0)  # [h, *dist]
            pos = m > 0
            log_m = torch.where(pos, torch.where(pos, m, 1.0).log(), float("-inf"))  # no 0 * inf in grads
            alibi = self.position_bias(i, j)
            return log_m if alibi is None else log_m + alibi.to(q.dtype)

        lo = self._reach(z)
        o = banded_attention(q, self.expand_kv(k), self.expand_kv(v), lo, 0 if self.causal else lo, bias,
                             dropout=self.dropout if self.training else 0.0, key_mask=self.key_mask(ctx))
        return self.out(o)


# The soft mask's log on the band, per element of [h, nb, B, K]: 7 elementwise ops (and the int64 distances);
# clamp and log keep their float inputs and the where its bool condition; at its largest, the ramp m, the
# condition, the log and the result are alive with the distances and the band's bool mask.
SPAN_BIAS = BandBias(other=lambda h, I: 7 * h * I + 2 * I, saved=lambda h, I, by: (2 * by + 1) * h * I,
                     peak=lambda h, I, by: 3 * h * I * by + h * I + 9 * I, grad=True)


def adaptive_span_cost(p: AdaptiveSpanAttentionParams, env: OpEnv, s: Symbols) -> Cost:
    """The full band of S keys: an upper bound, reached when some head's span is at its maximum (the band
    shrinks to R + max_h z_h with the learned spans, which only the data decides)."""
    S = s.sym("S", p.max_span)
    band = banded_attention_cost(p, env, s, lo=S - 1, hi=0 if env.causal else S - 1, bias=SPAN_BIAS,
                                 cache_keys=S)
    return replace(band, params=band.params + s.sym("h", p.heads))  # one learned span per head


OP = register(Op(
    decode="a cache of the last max_span keys and values (kv_heads heads), the soft mask on them",
    family="mha", variant="adaptive_span", params=AdaptiveSpanAttentionParams, module=AdaptiveSpanAttention,
    causal="yes", shape=adaptive_span_shape, supports=frozenset({"rope", "xpos", "alibi"}),
    paper="Adaptive Attention Span in Transformers, Sukhbaatar et al. 2019, arXiv:1905.07799",
    summary="a_tr ∝ m_z(x) exp(q_t.k_r/sqrt(dh)), m_z(x) = clamp((R + z_h - x)/R, 0, 1), x = t-r in 0..S-1 "
            "(bidirectional |t-r| < S), learned span z_h per head; aux loss penalty * mean_h z_h",
    note="MHA/LocalGlobal/005.md", cost=adaptive_span_cost,
))
