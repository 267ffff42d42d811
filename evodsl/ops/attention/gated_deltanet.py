"""mha(gated_deltanet): Gated DeltaNet, the delta rule with a decay gate (Yang, Kautz, Hatamizadeh 2024,
arXiv:2412.06464).

Per head, with k_t L2-normalised, beta_t = sigmoid(x_t W_beta) and a data-dependent decay a_t in (0, 1) (the state
transposed from the paper's, so that o_t = q_t^T S_t):

    S_t = a_t (I - beta_t k_t k_t^T) S_(t-1) + beta_t k_t v_t^T,        o_t = q_t^T S_t
    log a_t = -exp(A_log) softplus(x_t W_a + dt_bias)                    (Mamba-2's gate, fla's GatedDeltaNet)
    y_t = (RMSNorm_head(o_t) * swish(x_t W_g)) W_O

It runs as the chunked WY / UT form with the decay inside each chunk as ratios exp(B_i - B_j) <= 1 (section 3.3;
_chunked_delta.py), decodes by the recurrence (the state and the short convolutions' last K - 1 inputs) and
exports in one piece (a symbolic n only). The layer is fla's GatedDeltaNet (_delta_layer.py: short convolutions with
SiLU, L2-normalised q and k, q scaled by 1/sqrt(dk), the gated RMSNorm per head). Where the paper is silent: values
as wide as the heads (fla's expand_v = 2 is d_model's business here); A_log starts at log U(1, 16) and dt_bias at
softplus^-1 of a log-uniform dt in [0.001, 0.1] (fla's, Mamba-2's); grouped K/V heads share the key and value
projections and convolutions, each query head keeps its own beta, decay and state.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Op, OpEnv, register
from ._delta_layer import DeltaLayer, DeltaParams
from ._linear_recurrent import recurrent_shape
from ._recurrent_cost import gated_delta_cost


class GatedDeltaNetParams(DeltaParams):
    pass


class GatedDeltaNetAttention(DeltaLayer):
    gated_output = True
    decays = True

    def __init__(self, p: GatedDeltaNetParams, env: OpEnv):
        super().__init__(p, env)
        h = self.heads
        self.a_proj = nn.Linear(env.d, h, bias=False)
        self.A_log = nn.Parameter(torch.empty(h).uniform_(1, 16).log())
        dt = torch.exp(torch.rand(h) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))

    def log_decay(self, x):
        """log a_t [b, h, n]."""
        return (-self.A_log.exp() * F.softplus(self.a_proj(x) + self.dt_bias)).transpose(1, 2)


OP = register(Op(
    decode="the state S (dk x dv) of every query head and the short convolutions' last K - 1 inputs: constant in "
           "the tokens seen",
    family="mha", variant="gated_deltanet", params=GatedDeltaNetParams, module=GatedDeltaNetAttention,
    causal="yes", shape=recurrent_shape("mha(gated_deltanet)"), supports=frozenset(),
    paper="Gated Delta Networks: Improving Mamba2 with Delta Rule, Yang, Kautz, Hatamizadeh 2024, arXiv:2412.06464",
    summary="S_t = a_t (I - beta_t k_t k_t^T) S_(t-1) + beta_t k_t v_t^T, o_t = q_t^T S_t, a_t = exp(-e^A softplus(.)); "
            "short convolutions, gated RMSNorm per head; causal only; chunked (WY), O(n C d + n d dh)",
    cost=gated_delta_cost,
))
