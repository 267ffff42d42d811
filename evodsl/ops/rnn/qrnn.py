"""rnn(qrnn, window=2): the Quasi-Recurrent Neural Network layer (Bradbury, Merity, Xiong and Socher 2017,
arXiv:1611.01576, Section 2), with fo-pooling, as a sublayer on x [b, n, d] (hidden size d):

    Z = tanh(W_z * X),   F = sigmoid(W_f * X),   O = sigmoid(W_o * X)     masked convolutions of width k = window:
                                                                          position t reads x_{t-k+1} .. x_t
    c_t = f_t . c_{t-1} + (1 - f_t) . z_t                                 fo-pooling, c_{-1} = 0
    h_t = o_t . c_t

The three convolutions are one Conv1d(d, 3 d, k) over the input padded by k - 1 zeros in front (the paper's
masking), with a bias (bias=false drops it). fo-pooling is the diagonal linear recurrence of rnn/_diag_scan.py
with a_t = f_t and input (1 - f_t) z_t: the chunked doubling scan in training (no loop over tokens), the same
from a carried state to decode. The step form keeps the last k - 1 inputs [d, k - 1] and c [d], whatever the length.
Choices where the paper is silent or optional: no zoneout (a regulariser; dropout belongs to the spec), the hidden
size equals the stream's width d (a residual sublayer), the init is Conv1d's default. The paper's bidirectional
encoder runs a second layer backwards; here the layer is causal only. Padding: a padded position's input is zeroed
before the convolution (what the zero padding in front gives a sequence alone) and it leaves c unchanged (a = 1, no
input), so a padded row equals the sequence alone on either side.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...decode import slot
from ..registry import Op, OpEnv, OpParams, register
from ._gated import causal_rnn_shape, gate_padding, run_scan
from ._qrnn_cost import qrnn_cost


class QRNNParams(OpParams):
    window: int = Field(2, ge=1, le=64, description="k: the masked convolutions' width (1: a gated linear unit per token)")
    bias: bool = Field(True, description="a bias on the convolutions")
    chunk: int = Field(64, ge=1, le=4096, description="T: tokens per chunk of the scan (the result is the same)")


class QRNN(nn.Module):
    def __init__(self, p: QRNNParams, env: OpEnv):
        super().__init__()
        d = env.d
        self.d, self.k, self.chunk = d, p.window, p.chunk
        self.conv = nn.Conv1d(d, 3 * d, p.window, bias=p.bias)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        cache = None if ctx is None else ctx.cache
        keep = None if ctx is None or ctx.mask is None or ctx.right_padded else ctx.mask
        xt = x.transpose(1, 2)  # [b, d, n]
        if keep is not None:
            xt = xt * keep[:, None, :].to(xt.dtype)
        key = None if cache is None else slot(ctx, self)
        state = None if cache is None else cache.caches.get(key)
        xc = F.pad(xt, (self.k - 1, 0)) if state is None else torch.cat((state[0], xt), 2)
        if cache is not None:
            window = xc[:, :, xc.shape[2] - (self.k - 1):].clone()
        z, f, o = self.conv(xc).transpose(1, 2).chunk(3, -1)
        del xc, xt
        z, f, o = torch.tanh(z), torch.sigmoid(f), torch.sigmoid(o)
        a, u = gate_padding(f, (1 - f) * z, ctx)
        del z
        c = run_scan(self, a, u, ctx, None if state is None else state[1])
        if cache is not None:
            cache.caches[key] = (window, c[:, -1].clone())
        return o * c


OP = register(Op(
    decode="the last k - 1 inputs [d, k - 1] and the cell c [d]: constant in the length",
    family="rnn", variant="qrnn", params=QRNNParams, module=QRNN, causal="yes", shape=causal_rnn_shape("qrnn"),
    paper="Quasi-Recurrent Neural Networks, Bradbury, Merity, Xiong and Socher 2017, arXiv:1611.01576",
    summary="z, f, o = tanh, sigmoid, sigmoid of masked convolutions of width k; c_t = f_t c_{t-1} + (1 - f_t) z_t "
            "(fo-pooling, a chunked scan); h_t = o_t c_t",
    cost=qrnn_cost, note="",
))
