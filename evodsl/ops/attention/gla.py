"""mha(gla): gated linear attention (Yang, Wang, Shen, Panda, Kim 2023, arXiv:2312.06635, sections 3-4), as fla's
GatedLinearAttention layer wires it.

Per head, queries q_t = x_t W_Q / sqrt(dk), keys k_t = x_t W_K, values v_t = x_t W_V, and a data-dependent gate per
key channel from a low-rank projection:

    alpha_t = sigmoid(x_t W_1 W_2 + b)^(1/tau)       (W_1: d x rank, W_2: rank x dk; rank 16, tau 16)
    S_t = diag(alpha_t) S_(t-1) + k_t^T v_t,        o_t = q_t S_t
    y_t = (RMSNorm_head(o_t) * swish(x_t W_r + b_r)) W_O

It runs as the chunked form (section 4; _chunked_linear.py with the vector log decay log alpha_t = logsigmoid(.) /
tau), decodes by the recurrence (the state: dk x dv a head) and exports in the parallel form ([n, n, dk] decay
ratios, a symbolic n only).
Choices where the paper is silent or leaves a detail to fla's layer: the per-head norm is an RMSNorm with a learned
scale shared by the heads (fla's g_norm; the paper writes LayerNorm); keys and values are as wide as the heads
(fla's expand_k = 0.5 is d_model's business here); the queries carry the 1/sqrt(dk) (fla's scale); the gate has a
bias on W_2 only (fla's gk_proj); chunks of 16 tokens by default (a chunk whose decay is too fast for the
factorised form, a gate that closes at once, takes the decay ratios one lag at a time: exact). Grouped K/V heads
(kv_heads) share the key and value projections; each query head has its own gate and state.
"""
from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..registry import Op, OpEnv, register
from ._common import AttentionParams
from ._linear_recurrent import HeadNorm, RecurrentAttention, recurrent_shape
from ._recurrent_cost import gla_cost


class GLAParams(AttentionParams):
    rank: int = Field(16, ge=1, le=4096, description="rank of the gate's projection x W_1 W_2")
    tau: float = Field(16.0, gt=0.0, description="the gate's temperature: alpha = sigmoid(.)^(1/tau)")
    chunk: int = Field(16, ge=1, le=4096, description="tokens a chunk of the chunked form")


class GatedLinearAttention(RecurrentAttention):
    def __init__(self, p: GLAParams, env: OpEnv):
        super().__init__(p, env)
        width = self.heads * self.head_dim
        self.gk_down = nn.Linear(env.d, p.rank, bias=False)
        self.gk_up = nn.Linear(p.rank, width, bias=True)
        self.g_proj = nn.Linear(env.d, width, bias=p.bias)
        self.g_norm = HeadNorm(self.head_dim, rms=True)
        self.tau = p.tau

    def features(self, x, ctx, offset):
        q, k, v = self.qkv(x)
        b, h, n, dh = q.shape
        g = F.logsigmoid(self.gk_up(self.gk_down(x))) / self.tau
        # v laid out by head (one copy): its chunks feed two matmuls, which would each copy a strided view
        return q * dh ** -0.5, self.expand_kv(k), self.expand_kv(v).contiguous(), g.view(b, n, h, dh).transpose(1, 2), None

    def finish(self, x, o):
        b, h, n, dv = o.shape
        o = self.g_norm(o).transpose(1, 2).reshape(b, n, h * dv)
        return self.o_proj(F.silu(self.g_proj(x)) * o)


OP = register(Op(
    decode="the state S = sum_j diag(prod alpha) k_j^T v_j of every query head (dh x dh): constant in the tokens seen",
    family="mha", variant="gla", params=GLAParams, module=GatedLinearAttention,
    causal="yes", shape=recurrent_shape("mha(gla)"), supports=frozenset(),
    paper="Gated Linear Attention Transformers with Hardware-Efficient Training, Yang et al. 2023, arXiv:2312.06635",
    summary="S_t = diag(alpha_t) S_(t-1) + k_t^T v_t, o_t = q_t S_t, alpha_t = sigmoid(x W1 W2 + b)^(1/16); "
            "RMSNorm per head, swish gate; causal only; chunked, O(n C d + n d dh)",
    cost=gla_cost,
))
