"""rnn(gilr): the gated impulse linear recurrent layer (Martin and Cundy 2018, "Parallelizing Linear Recurrent Neural
Nets Over Sequence Length", arXiv:1709.04057, Section 4), as a sublayer on x [b, n, d] (hidden size d):

    g_t = sigmoid(W_g x_t + b_g),   z_t = tanh(W_z x_t + b_z)          one Linear(d, 2 d) for both
    h_t = g_t . h_{t-1} + (1 - g_t) . z_t                              h_{-1} = 0

The recurrence is linear in h (the gates read only the input), so it runs as the paper's parallel linear
recurrence: rnn/_diag_scan.py's chunked doubling scan in training (no loop over tokens; its backward is the reverse
recurrence, as the paper derives), the same scan from a carried h to decode (the state: h [d], whatever the length).
lstm=true is the paper's GILR-LSTM (its "Linear surrogate RNNs" subsection): an LSTM whose gates read the GILR's
state h~ (a linear surrogate of the LSTM's h) in place of h_{t-1}:

    g_t = sigmoid(V_g x_t + b_g),  j_t = tanh(V_j x_t + b_j),  h~_t = g_t . h~_{t-1} + (1 - g_t) . j_t
    f_t, i_t, o_t = sigmoid(U_{f,i,o} h~_{t-1} + V_{f,i,o} x_t + b_{f,i,o}),  z_t = tanh(U_z h~_{t-1} + V_z x_t + b_z)
    c_t = f_t . c_{t-1} + i_t . z_t,   y_t = o_t . c_t

Both recurrences are linear (the gates read x and h~, never c or y), so training runs two chunked scans (h~, then c)
with the U products for all tokens at once between them; decoding carries (h~, c) [2 d]. y_t = o_t c_t as the paper
writes it (no tanh on c; the LSTM it starts from is written the same way).
Choices where the paper is silent: the hidden size equals the stream's width d (a residual sublayer), biases on
(bias=false drops them; none on U, as the paper), tanh as the paper's tau, Linear's default init, V_{g,j,f,i,o,z}
as one Linear(d, 6 d). Causal only. Padding: a padded position leaves h (h~ and c) unchanged (decay 1, no input),
on either side.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from ...decode import slot
from ..registry import Op, OpEnv, OpParams, register
from ._gated import causal_rnn_shape, gate_padding, run_scan
from ._gilr_cost import gilr_cost


class GILRParams(OpParams):
    bias: bool = Field(True, description="biases on the gate and input projections")
    chunk: int = Field(64, ge=1, le=4096, description="T: tokens per chunk of the scan (the result is the same)")
    lstm: bool = Field(False, description="the GILR-LSTM: an LSTM cell (its cell state a second scan) whose gates "
                       "read the GILR state h~_{t-1} in place of h_{t-1}")


class GILR(nn.Module):
    def __init__(self, p: GILRParams, env: OpEnv):
        super().__init__()
        self.chunk, self.lstm = p.chunk, p.lstm
        self.proj = nn.Linear(env.d, (6 if p.lstm else 2) * env.d, bias=p.bias)  # V_g, V_j (V_f, V_i, V_o, V_z)
        if p.lstm:
            self.recur = nn.Linear(env.d, 4 * env.d, bias=False)  # U_f, U_i, U_o, U_z

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        cache = None if ctx is None else ctx.cache
        key = None if cache is None else slot(ctx, self)
        state = None if cache is None else cache.caches.get(key)
        if self.lstm:
            return self.gilr_lstm(x, ctx, state, cache, key)
        g, z = self.proj(x).chunk(2, -1)
        g, z = torch.sigmoid(g), torch.tanh(z)
        a, u = gate_padding(g, (1 - g) * z, ctx)
        del z
        h = run_scan(self, a, u, ctx, state)
        if cache is not None:
            cache.caches[key] = h[:, -1].clone()
        return h

    def gilr_lstm(self, x, ctx, state, cache, key):
        d = x.shape[-1]
        g, j, pre = self.proj(x).split((d, d, 4 * d), -1)
        g = torch.sigmoid(g)
        a, u = gate_padding(g, (1 - g) * torch.tanh(j), ctx)
        del g, j
        h0 = None if state is None else state[0]
        hs = run_scan(self, a, u, ctx, h0)  # h~_t for every t
        del a, u
        prev = F.pad(hs, (0, 0, 1, -1))  # h~_{t-1}: shifted one token, h~_{-1} = 0 (no slice: the export's n)
        if h0 is not None:  # decoding: the carried h~
            prev = torch.cat((h0[:, None], prev[:, 1:]), 1)
        gates = self.recur(prev).add_(pre)  # U h~_{t-1} + V x_t + b (in place: U h~ is no backward's input)
        del pre, prev
        f, i, o, z = gates.split(d, -1)
        f, o, u = torch.sigmoid(f), torch.sigmoid(o), torch.sigmoid(i) * torch.tanh(z)
        del gates, i, z
        a, u = gate_padding(f, u, ctx)
        del f
        c = run_scan(self, a, u, ctx, None if state is None else state[1])
        if cache is not None:
            cache.caches[key] = (hs[:, -1].clone(), c[:, -1].clone())
        return o * c

OP = register(Op(
    decode="the state h [d] (lstm: h~ and c, [2 d]): constant in the length",
    family="rnn", variant="gilr", params=GILRParams, module=GILR, causal="yes", shape=causal_rnn_shape("gilr"),
    paper="Parallelizing Linear Recurrent Neural Nets Over Sequence Length, Martin and Cundy 2018, arXiv:1709.04057",
    summary="g = sigmoid(W_g x + b_g), z = tanh(W_z x + b_z); h_t = g_t h_{t-1} + (1 - g_t) z_t by a parallel "
            "(chunked doubling) scan; lstm: the GILR-LSTM, f, i, o, z from x and h~_{t-1}, c_t = f_t c_{t-1} + i_t z_t "
            "by a second scan, y_t = o_t c_t",
    cost=gilr_cost, note="",
))
