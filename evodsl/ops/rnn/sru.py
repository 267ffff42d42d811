"""rnn(sru, scan=false): the Simple Recurrent Unit (Lei, Zhang, Wang, Dai and Artzi 2018, "Simple Recurrent Units
for Highly Parallelizable Recurrence", arXiv:1709.02755, Section 2, the form SRU++ (arXiv:2102.12459) builds on), as a
sublayer on x [b, n, d] (hidden size d):

    z_t, u_t, s_t = W x_t                                      one Linear(d, 3 d), all tokens at once
    f_t = sigmoid(u_t + v_f . c_{t-1} + b_f)                   the forget gate
    r_t = sigmoid(s_t + v_r . c_{t-1} + b_r)                   the reset (highway) gate
    c_t = f_t . c_{t-1} + (1 - f_t) . z_t                      c_{-1} = 0
    h_t = r_t . c_t + (1 - r_t) . x_t                          the highway connection

The gates read c_{t-1} through v_f, v_r: a nonlinear recurrence (c_t is not linear in c_{t-1} through f_t), which
no parallel scan computes. Its training path therefore precomputes every matmul (W x for all tokens) and loops
over tokens only for the elementwise core (O(d) per token; the paper's CUDA kernel does the same, in one launch).
scan=true drops v_f, v_r (v = 0): the gates read only the input, c is the diagonal linear recurrence
c_t = f_t c_{t-1} + (1 - f_t) z_t, and training runs rnn/_diag_scan.py's chunked doubling scan (no token loop).
Decoding keeps c [d], whatever the length, in both forms. attention=true is SRU++ (_sru_attention.py): W x becomes
W_o (Q + alpha Attention(Q)), one causal head of width p (proj, d / 4 by default); its decoding state also keeps the
keys and values of every position (it grows with the length, declared so). Choices where the paper is silent or
optional: no tanh on c, no scaling of the highway input, b_f = b_r = 0 at init, v_f, v_r uniform in [-0.5, 0.5],
Linear's default init, no dropout (the spec's). Causal only. Padding: a padded position leaves c unchanged, on
either side. The ONNX export (a symbolic n) takes scan=true only; the token loop refuses it (E455).
"""
from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field
from torch import nn

from ...decode import slot
from ...diagnostics import Diagnostic, EvoError
from ..registry import Op, OpEnv, OpParams, register
from ._gated import causal_rnn_shape, gate_padding, run_scan
from ._sru_attention import SRUAttention
from ._sru_cost import sru_cost


class SRUParams(OpParams):
    scan: bool = Field(False, description="v_f = v_r = 0: the gates read only the input, c by a parallel scan")
    chunk: int = Field(64, ge=1, le=4096, description="T: tokens per chunk of the parallel form's scan")
    attention: bool = Field(False, description="SRU++: U = W_o (Q + alpha Attention(Q)) in place of W x")
    proj: Optional[int] = Field(None, ge=1, le=65536, description="p: SRU++'s attention width; None = max(1, d // 4)")


def proj_width(p: SRUParams, d: int) -> int:
    return max(1, d // 4) if p.proj is None else p.proj


def light_recurrence(U, v, bias, c, keep):
    """The elementwise core, token by token (U [b, n, 3 d] precomputed; v [2 d]; c [b, d] or None): (C, R) [b, n, d].
    The tokens are unbound, not indexed: an index's backward writes into a zero tensor of the whole length, once per
    token (quadratic); unbind's is one stack."""
    b, n, three = U.shape
    d = three // 3
    c = U.new_zeros(b, d) if c is None else c
    vf, vr = v.split(d)
    bf, br = bias.split(d)
    cs, rs = [], []
    keeps = [None] * n if keep is None else keep.unbind(1)
    for Ut, kt in zip(U.unbind(1), keeps):
        z, u, s = Ut.split(d, -1)
        f = torch.sigmoid(u + vf * c + bf)
        rs.append(torch.sigmoid(s + vr * c + br))
        new = z + f * (c - z)
        c = new if kt is None else torch.where(kt[:, None], new, c)
        cs.append(c)
    return torch.stack(cs, 1), torch.stack(rs, 1)


class SRU(nn.Module):
    def __init__(self, p: SRUParams, env: OpEnv):
        super().__init__()
        d = env.d
        self.d, self.chunk, self.scan = d, p.chunk, p.scan
        self.W = SRUAttention(d, proj_width(p, d)) if p.attention else nn.Linear(d, 3 * d, bias=False)
        self.attention = p.attention
        self.bias = nn.Parameter(torch.zeros(2 * d))  # b_f, b_r
        if not p.scan:
            self.v = nn.Parameter(torch.rand(2 * d) - 0.5)  # v_f, v_r

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        cache = None if ctx is None else ctx.cache
        key = None if cache is None else slot(ctx, self)
        state = None if cache is None else cache.caches.get(key)
        U = self.W(x, ctx) if self.attention else self.W(x)
        if self.scan:
            z, u, s = U.split(self.d, -1)
            f = torch.sigmoid(u + self.bias[:self.d])
            r = torch.sigmoid(s + self.bias[self.d:])
            a, w = gate_padding(f, (1 - f) * z, ctx)
            del z, u, s
            c = run_scan(self, a, w, ctx, state)
        else:
            if not isinstance(x.shape[1], int) or torch.compiler.is_exporting():
                raise EvoError([Diagnostic(
                    "E455", "rnn(sru) with scan=false cannot be exported with a symbolic length: its light recurrence "
                            "(v . c_{t-1} in the gates) is a loop over tokens",
                    help="export rnn(sru, scan=true) (v = 0: a parallel scan), or run this one in torch")])
            keep = None if ctx is None or ctx.mask is None or ctx.right_padded else ctx.mask
            c, r = light_recurrence(U, self.v, self.bias, state, keep)
        if cache is not None:
            cache.caches[key] = c[:, -1].clone()
        return torch.addcmul(x, r, c - x)


OP = register(Op(
    decode=lambda p: ("the cell c [d] and the attention's keys and values of every position [n, 2 p]: grows with the "
                      "length" if p.attention else "the cell c [d]: constant in the length"),
    family="rnn", variant="sru", params=SRUParams, module=SRU, causal="yes", shape=causal_rnn_shape("sru"),
    paper="Simple Recurrent Units for Highly Parallelizable Recurrence, Lei et al. 2018, arXiv:1709.02755; SRU++: "
          "When Attention Meets Fast Recurrence, Lei 2021, arXiv:2102.12459",
    summary="z, u, s = W x (SRU++: W_o (Q + alpha Attention(Q))); f = sigmoid(u + v_f c_{t-1} + b_f), "
            "r = sigmoid(s + v_r c_{t-1} + b_r); c_t = f c_{t-1} + (1 - f) z; h = r c + (1 - r) x; a token loop of "
            "elementwise ops (scan=true: v = 0, a chunked scan)",
    cost=sru_cost, note="Rnn/001.md",
))
