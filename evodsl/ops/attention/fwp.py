"""mha(fwp): a fast weight programmer with the delta rule and the DPFP feature map (Schlag, Irie, Schmidhuber 2021,
"Linear Transformers Are Secretly Fast Weight Programmers", arXiv:2102.11174, sections 4-5).

Per head, k_t = x_t W_K, v_t = x_t W_V, q_t = x_t W_Q, beta_t = sigmoid(x_t W_beta) (one per head), the
deterministic parameter-free projection DPFP-nu of a dh-wide x (r = ReLU([x, -x]), 2 dh wide, indices mod 2 dh)

    phi(x) = [r * roll(r, 1), .., r * roll(r, nu)]        (2 dh nu features; roll(r, j)_i = r_(i-j))
    phi'(x) = phi(x) / sum_i phi(x)_i                     (keys and queries sum-normalised)
    v-bar_t = W_(t-1) phi'(k_t),   W_t = W_(t-1) + beta_t (v_t - v-bar_t) (x) phi'(k_t),   y_t = W_t phi'(q_t)

so, with the state S = W^T [2 dh nu, dh]: S_t = (I - beta_t k'_t k'_t^T) S_(t-1) + beta_t k'_t v_t^T, o_t = S_t^T q'_t,
the delta rule of _chunked_delta.py with k'_t = phi'(k_t) and q'_t = phi'(q_t): it runs chunked (the WY form), decodes
by the recurrence (2 dh nu x dh a head) and exports in one piece. The output is W_O on the heads concatenated.
Choices where the paper is silent or leaves it to its code (IDSIA/lmtool-fwp): the roll direction of its dpfp
(x * roll(x, j)), a feature sum of 0 (possible only in degenerate heads) divided by 1, not 0; no output norm; the
values as wide as the heads. Grouped K/V heads (kv_heads) share W_K, W_V; each query head has its own beta and state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..registry import Op, OpEnv, register
from ._common import AttentionParams
from ._fwp_cost import fwp_cost
from ._linear_recurrent import RecurrentAttention, recurrent_shape


class FWPParams(AttentionParams):
    nu: int = Field(1, ge=1, le=3, description="DPFP-nu: 2 dh nu features a head")
    chunk: int = Field(64, ge=1, le=4096, description="tokens a chunk of the chunked (WY) form")


def dpfp(x: torch.Tensor, nu: int) -> torch.Tensor:
    """[..., dh] -> [..., 2 dh nu], sum-normalised."""
    r = torch.cat((F.relu(x), F.relu(-x)), -1)
    phi = torch.cat([r * r.roll(j, -1) for j in range(1, nu + 1)], -1)
    total = phi.sum(-1, keepdim=True)
    return phi / (total + (total == 0).to(total.dtype))


class FastWeightAttention(RecurrentAttention):
    delta = True

    def __init__(self, p: FWPParams, env: OpEnv):
        super().__init__(p, env)
        self.nu = p.nu
        self.b_proj = nn.Linear(env.d, self.heads, bias=p.bias)

    def features(self, x, ctx, offset):
        q, k, v = self.qkv(x)
        beta = torch.sigmoid(self.b_proj(x)).transpose(1, 2)  # [b, h, n]
        return dpfp(q, self.nu), self.expand_kv(dpfp(k, self.nu)), self.expand_kv(v), None, beta

    def finish(self, x, o):
        return self.out(o)


OP = register(Op(
    decode="the fast weights S (2 dh nu x dh) of every query head: constant in the tokens seen",
    family="mha", variant="fwp", params=FWPParams, module=FastWeightAttention,
    causal="yes", shape=recurrent_shape("mha(fwp)"), supports=frozenset(),
    paper="Linear Transformers Are Secretly Fast Weight Programmers, Schlag, Irie, Schmidhuber 2021, "
          "arXiv:2102.11174",
    summary="W_t = W_(t-1) + beta_t (v_t - W_(t-1) phi(k_t)) (x) phi(k_t), y_t = W_t phi(q_t), phi = DPFP-nu "
            "sum-normalised, beta = sigmoid; causal only; chunked (WY), O(n C dh nu + n dh^2 nu)",
    cost=fwp_cost,
))
