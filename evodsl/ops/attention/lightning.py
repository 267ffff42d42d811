"""mha(lightning): Lightning Attention-2, linear attention with a decay per head computed in tiles, in the
TransNormerLLM layer it was built for (Qin, Sun, Li, Shen, Sun, Zhong 2024, arXiv:2401.04658, section 3; the layer of
TransNormerLLM, Qin et al. 2023, arXiv:2307.14995, section 3.2).

Per head h, Q = swish(X W_Q), K = swish(X W_K), V = X W_V, U = X W_U and the decay lambda_h:

    o_t = sum_{j<=t} lambda_h^(t-j) (q_t^T k_j) v_j          (recurrent: S_t = lambda_h S_(t-1) + k_t v_t^T, o_t = q_t^T S_t)
    y_t = (SRMSNorm(o_t) * u_t) W_O,      SRMSNorm(x) = x / sqrt(mean(x^2) + eps)   (over all heads, no weight)
    lambda_h = exp(-(8 h / H) (1 - r)),   h = 1 .. H   (TransNormerLLM's decay; r = l / L, the layer's depth, 0 default)

Lightning Attention-2's tiling is the chunked form: within a block the masked (Q K^T * decay) V, across blocks the
state carried with its decay: _chunked_linear.py's algorithm with the scalar log decay log lambda_h (reused; a loop
over blocks, never over tokens); decoding is the recurrence (dh x dh a head); the export runs the one-piece [n, n]
form. Choices where the papers are silent: no 1/sqrt(dh) scale (TransNormerLLM has none: the norm follows); the
norm's eps 1e-6; the gate U is linear (the paper's U = X W_U; no activation); the layer index the decay needs is
the op's `depth` = l / L (an op does not know its place in the stack), or `decay` gives every head one lambda.
Grouped K/V heads (kv_heads) share the projections; each query head has its own decay and state.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..registry import Op, OpEnv, register
from ._common import AttentionParams
from ._lightning_cost import lightning_cost
from ._linear_recurrent import RecurrentAttention, recurrent_shape


class LightningParams(AttentionParams):
    depth: float = Field(0.0, ge=0.0, lt=1.0, description="r = l / L, the layer's depth in the stack: lambda_h = "
                                                          "exp(-(8 h / H)(1 - r))")
    decay: float | None = Field(None, gt=0.0, lt=1.0, description="one lambda for every head, in place of the "
                                                                  "per-head formula")
    chunk: int = Field(64, ge=1, le=4096, description="tokens a block (tile) of the chunked form")


def log_decays(p: LightningParams, heads: int) -> torch.Tensor:
    """log lambda per head [h], float64."""
    if p.decay is not None:
        return torch.full((heads,), math.log(p.decay), dtype=torch.float64)
    h = torch.arange(1, heads + 1, dtype=torch.float64)
    return -(8.0 * h / heads) * (1.0 - p.depth)


class LightningAttention(RecurrentAttention):
    def __init__(self, p: LightningParams, env: OpEnv):
        super().__init__(p, env)
        self.u_proj = nn.Linear(env.d, self.heads * self.head_dim, bias=p.bias)
        self.register_buffer("log_decay", log_decays(p, self.heads), persistent=False)

    def features(self, x, ctx, offset):
        q, k, v = self.qkv(x)
        b, h, n, _ = q.shape
        g = self.log_decay.to(q.dtype)[None, :, None].expand(b, h, n)
        return F.silu(q), self.expand_kv(F.silu(k)), self.expand_kv(v), g, None

    def finish(self, x, o):
        b, h, n, dv = o.shape
        o = o.transpose(1, 2).reshape(b, n, h * dv)
        return self.o_proj(o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * self.u_proj(x))


OP = register(Op(
    decode="the state S = sum_j lambda_h^(t-j) k_j v_j^T of every query head (dh x dh): constant in the tokens seen",
    family="mha", variant="lightning", params=LightningParams, module=LightningAttention,
    causal="yes", shape=recurrent_shape("mha(lightning)"), supports=frozenset(),
    paper="Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language Models, "
          "Qin et al. 2024, arXiv:2401.04658",
    summary="o_t = sum_{j<=t} lambda_h^(t-j) (q_t . k_j) v_j, q, k = swish, lambda_h = exp(-8h/H); SRMSNorm, gate U; "
          "causal only; tiled (chunked), O(n C d + n d dh)",
    cost=lightning_cost,
))
