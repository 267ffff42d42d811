"""rnn(gilr): the gated impulse linear recurrent layer (Martin and Cundy 2018, "Parallelizing Linear Recurrent Neural
Nets Over Sequence Length", arXiv:1709.04057, Section 4), as a sublayer on x [b, n, d] (hidden size d):

    g_t = sigmoid(W_g x_t + b_g),   z_t = tanh(W_z x_t + b_z)          one Linear(d, 2 d) for both
    h_t = g_t . h_{t-1} + (1 - g_t) . z_t                              h_{-1} = 0

The recurrence is linear in h (the gates read only the input), so it runs as the paper's parallel linear
recurrence: rnn/_diag_scan.py's chunked doubling scan in training (no loop over tokens; its backward is the reverse
recurrence, as the paper derives), the same scan from a carried h to decode (the state: h [d], whatever the length).
Choices where the paper is silent: the hidden size equals the stream's width d (a residual sublayer), biases on
(bias=false drops them), Linear's default init; the paper's GILR-LSTM (an LSTM-like cell around the same scan) is
not built here. Causal only. Padding: a padded position leaves h unchanged (g = 1, no input), on either side.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ...decode import slot
from ..registry import Op, OpEnv, OpParams, register
from ._gated import causal_rnn_shape, gate_padding, run_scan
from ._gilr_cost import gilr_cost


class GILRParams(OpParams):
    bias: bool = Field(True, description="biases on the gate and input projections")
    chunk: int = Field(64, ge=1, le=4096, description="T: tokens per chunk of the scan (the result is the same)")


class GILR(nn.Module):
    def __init__(self, p: GILRParams, env: OpEnv):
        super().__init__()
        self.chunk = p.chunk
        self.proj = nn.Linear(env.d, 2 * env.d, bias=p.bias)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        cache = None if ctx is None else ctx.cache
        key = None if cache is None else slot(ctx, self)
        state = None if cache is None else cache.caches.get(key)
        g, z = self.proj(x).chunk(2, -1)
        g, z = torch.sigmoid(g), torch.tanh(z)
        a, u = gate_padding(g, (1 - g) * z, ctx)
        del z
        h = run_scan(self, a, u, ctx, state)
        if cache is not None:
            cache.caches[key] = h[:, -1].clone()
        return h


OP = register(Op(
    decode="the state h [d]: constant in the length",
    family="rnn", variant="gilr", params=GILRParams, module=GILR, causal="yes", shape=causal_rnn_shape("gilr"),
    paper="Parallelizing Linear Recurrent Neural Nets Over Sequence Length, Martin and Cundy 2018, arXiv:1709.04057",
    summary="g = sigmoid(W_g x + b_g), z = tanh(W_z x + b_z); h_t = g_t h_{t-1} + (1 - g_t) z_t by a parallel "
            "(chunked doubling) scan",
    cost=gilr_cost, note="",
))
