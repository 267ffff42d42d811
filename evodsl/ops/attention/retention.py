"""mha(retention): multi-scale retention, RetNet (Sun, Dong, Huang, Ma, Xia, Xue, Wang, Wei 2023, arXiv:2307.08621,
section 2).

Per head h, with its decay gamma_h, the rotated queries and keys Q_n = (X W_Q)_n e^{i n theta},
K_m = (X W_K)_m e^{-i m theta} / sqrt(dh) (the paper's xPos-like Theta: a rotation of channel pairs) and V = X W_V:

    parallel:   Retention(X) = (Q K^T * D) V,       D_nm = gamma^(n-m) for n >= m, else 0
    recurrent:  S_n = gamma S_(n-1) + K_n^T V_n,    Retention(X_n) = Q_n S_n
    MSR(X) = (swish(X W_G) * GroupNorm_h(head_1, .., head_h)) W_O,     gamma_h = 1 - 2^(-5-h),  h = 0 .. heads-1

It runs as the chunked form (section 2.2; _chunked_linear.py, the scalar decay log gamma_h), decodes by the
recurrence (the state S: dh x dh a head) and exports in the parallel form.
Choices where the paper is silent or leaves a detail to its code (torchscale's RetNet): the rotation pairs
channels (2i, 2i+1) at angles theta_i = 10000^(-i / (dh/2 - 1)), i < dh / 2 (torchscale's linspace; a head
needs an even width; rotate=false drops it); values are as wide as queries (the paper's 2x wider values are
v_factor's business); GroupNorm has one group a head with a learned scale and shift per channel (eps 1e-5);
values default to the queries' width; v_factor=2 gives the paper's models (values, the gate, GroupNorm and
o_proj's input twice as wide: MSR's 8 d^2 parameters beside an FFN of 2 d, section 3.1); the decay and score
normalisations of the official code are left out: they scale each head's output row and
GroupNorm removes such a scale (up to its eps); gamma= gives every head one decay. Grouped K/V heads (kv_heads)
share the projections; each query head keeps its own state (its own decay).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..registry import Op, OpEnv, register
from ._common import AttentionParams
from ._linear_recurrent import RecurrentAttention, recurrent_shape
from ._recurrent_cost import retention_cost


class RetentionParams(AttentionParams):
    gamma: float | None = Field(None, gt=0.0, lt=1.0, description="one decay for every head; default the "
                                                                  "multi-scale 1 - 2^(-5-h) of head h")
    rotate: bool = Field(True, description="the paper's xPos-like rotation of q and k (channel pairs)")
    chunk: int = Field(64, ge=1, le=4096, description="tokens a chunk of the chunked form")
    v_factor: int = Field(1, ge=1, le=8, description="values (and the gate, GroupNorm, o_proj's input) this many "
                                                     "times as wide as a head's queries; RetNet's models use 2")


def decays(p: RetentionParams, heads: int) -> torch.Tensor:
    """log gamma per head [h], float64."""
    if p.gamma is not None:
        return torch.full((heads,), math.log(p.gamma), dtype=torch.float64)
    return torch.log1p(-torch.exp2(-5.0 - torch.arange(heads, dtype=torch.float64)))


def rotate_pairs(x: torch.Tensor, offset: int, angles: torch.Tensor) -> torch.Tensor:
    """x [b, h, n, dh] with channel pairs (2i, 2i+1) turned by (offset + position) theta_i."""
    n = x.shape[2]
    pos = torch.arange(n, device=x.device, dtype=angles.dtype) + offset
    phase = pos[:, None] * angles[None, :]  # [n, dh/2]
    cos, sin = phase.cos().to(x.dtype), phase.sin().to(x.dtype)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2)


class RetentionAttention(RecurrentAttention):
    def __init__(self, p: RetentionParams, env: OpEnv):
        super().__init__(p, env)
        self.v_dim = self.head_dim * p.v_factor
        width = self.heads * self.v_dim
        if p.v_factor != 1:
            self.v_proj = nn.Linear(env.d, self.kv_heads * self.v_dim, bias=p.bias)
            self.o_proj = nn.Linear(width, env.d, bias=p.bias)
        self.g_proj = nn.Linear(env.d, width, bias=p.bias)
        self.group_norm = nn.GroupNorm(self.heads, width, eps=1e-5)
        self.register_buffer("log_gamma", decays(p, self.heads), persistent=False)
        half = self.head_dim // 2
        self.register_buffer("angles", 10000.0 ** -torch.linspace(0, 1, half, dtype=torch.float64)
                             if p.rotate else None, persistent=False)

    def features(self, x, ctx, offset):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.v_dim).transpose(1, 2)
        if self.angles is not None:
            q, k = rotate_pairs(q, offset, self.angles), rotate_pairs(k, offset, self.angles)
        k = self.expand_kv(k * self.head_dim ** -0.5)
        g = self.log_gamma.to(q.dtype)[None, :, None].expand(b, self.heads, n)
        return q, k, self.expand_kv(v), g, None

    def finish(self, x, o):
        b, h, n, dv = o.shape
        o = self.group_norm(o.transpose(1, 2).reshape(b * n, h * dv)).view(b, n, h * dv)
        return self.o_proj(F.silu(self.g_proj(x)) * o)


OP = register(Op(
    decode="the state S = sum_m gamma^(n-m) K_m^T V_m of every query head (dh x dh): constant in the tokens seen",
    family="mha", variant="retention", params=RetentionParams, module=RetentionAttention,
    causal="yes", shape=recurrent_shape("mha(retention)", even=True), supports=frozenset(),
    paper="Retentive Network: A Successor to Transformer for Large Language Models, Sun et al. 2023, "
          "arXiv:2307.08621",
    summary="(Q K^T * D) V, D_nm = gamma_h^(n-m) (n >= m), gamma_h = 1 - 2^(-5-h); GroupNorm per head, swish gate; "
            "causal only; chunked, O(n C d + n d dh)",
    cost=retention_cost,
))
