"""rnn(mlstm, heads, expand=2, conv=4, forget=sigmoid): xLSTM's mLSTM layer (Beck, Pöppel, Spanring, Auer, Prudnikova,
Kopp, Klambauer, Brandstetter, Hochreiter 2024, arXiv:2405.04517, section 2.3 and figure 10: the mLSTM block with
pre up-projection), as a sublayer (the block's pre-norm and residual are the model's):

    x_m, z = W_up u                                      [b, n, E] each, E = expand d
    x_c    = swish(causal depthwise conv(x_m))           kernel k = conv, k - 1 zeros before
    q, k, v = W_q x_c, W_k x_c / sqrt(dh), W_v x_m       H heads of dh = E / H
    i~, f~ = W_i [q; k; v] + b_i, W_f [q; k; v] + b_f    one per head and token; i = exp(i~), f = sigmoid(f~) | exp(f~)
    C_t = f_t C_(t-1) + i_t k_t v_t^T,  n_t = f_t n_(t-1) + i_t k_t,  h_t = q_t C_t / max(|q_t . n_t|, 1)
    y = W_down ((GroupNorm_heads(h) + s * x_c) * swish(z))          s: the learnable skip, per channel

The cell runs chunked with the max stabiliser carried from chunk to chunk (_mlstm_kernel.py; the result does not
depend on the stabiliser), decodes by its recurrent step (the state: the convolution's last k - 1 inputs, and per
head C' [dh, dh], n' [dh] and m), and exports in xLSTM's one-piece stabilised parallel form ([n, n] log weights: a
symbolic n only; tests/test_onnx.py OTHER_FORMS). In the op: the up-projection, the short convolution, q/k/v, both
gates, the cell, the per-head norm, the learnable skip, the output gate swish(z) (the block's; the cell's own
sigmoid output gate of eq. 25 is what the block replaces by it) and the down-projection.
The convolution runs as k shifted multiply-adds (its weights an nn.Conv1d's, depthwise).
Choices where the paper is silent, as NX-AI/xlstm's mLSTMLayer: no biases on the projections (bias= adds them to
the up- and down-projections), a bias on the convolution; the gates read q, k and v concatenated; the forget gate's
bias starts at linspace(3, 6) over the heads, the input gate's at N(0, 0.1); the norm is a LayerNorm per head with a
weight and no bias; the skip starts at 1. q, k and v are dense E x E projections (xLSTM's are block-diagonal with
blocks of 4: left out); xLSTM adds an eps = 1e-6 to the normaliser, which would make the result depend on the
stabiliser (left out). Padding: a padded position enters neither the state (i~ = -inf, log f = 0) nor the
convolution (its input zeroed), so either side pads.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...decode import slot
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register, sequence_shape
from ._mlstm_cost import mlstm_cost
from ._mlstm_kernel import chunked_mlstm, parallel_mlstm, recurrent_mlstm


class MLSTMParams(OpParams):
    heads: int = Field(4, ge=1, le=4096, description="H: heads of the matrix memory, dh = E / H wide")
    expand: int = Field(2, ge=1, le=16, description="E = expand d: the up-projection's width")
    conv: int = Field(4, ge=1, le=64, description="k: the causal depthwise convolution's kernel")
    forget: Literal["sigmoid", "exp"] = Field("sigmoid", description="the forget gate: sigmoid(f~) or exp(f~)")
    chunk: int = Field(64, ge=1, le=4096, description="C: tokens a chunk of the chunked form (the result is the same)")
    eps: float = Field(1e-5, gt=0.0, description="the per-head norm's epsilon")
    bias: bool = Field(False, description="biases on the up- and down-projections")


def mlstm_shape(p: MLSTMParams, env: OpEnv):
    shape = sequence_shape(p, env)
    if not env.causal:
        raise ShapeProblem("rnn(mlstm) is causal only: its memory runs forward in time, and the paper gives no "
                           "bidirectional form", None, "use it in a causal model (head(lm))")
    if p.expand * env.d % p.heads:
        raise ShapeProblem(f"the inner width E = {p.expand * env.d} is not divisible by heads={p.heads}", "heads",
                           "each head holds E / heads channels")
    return shape


class MLSTMLayer(nn.Module):
    def __init__(self, p: MLSTMParams, env: OpEnv):
        super().__init__()
        d, E, H = env.d, p.expand * env.d, p.heads
        self.E, self.H, self.dh, self.k, self.chunk, self.eps = E, H, E // H, p.conv, p.chunk, p.eps
        self.exp_forget = p.forget == "exp"
        self.proj_up = nn.Linear(d, 2 * E, bias=p.bias)
        self.conv1d = nn.Conv1d(E, E, p.conv, groups=E, bias=True)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(E, E, bias=False) for _ in range(3))
        self.igate, self.fgate = nn.Linear(3 * E, H), nn.Linear(3 * E, H)
        self.norm_weight = nn.Parameter(torch.ones(E))
        self.skip = nn.Parameter(torch.ones(E))
        self.proj_down = nn.Linear(E, d, bias=p.bias)
        with torch.no_grad():
            nn.init.zeros_(self.fgate.weight)
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, H))
            nn.init.zeros_(self.igate.weight)
            nn.init.normal_(self.igate.bias, std=0.1)

    def short_conv(self, xc: torch.Tensor) -> torch.Tensor:
        """The depthwise causal convolution as k shifted multiply-adds on [b, E, n + k - 1] (torch's grouped conv
        runs a kernel per channel on the CPU in float64, a hundred times slower at these widths)."""
        w, k = self.conv1d.weight[:, 0, :, None], self.k
        out = self.conv1d.bias[:, None] + w[:, 0] * xc[:, :, :xc.shape[2] - (k - 1)]
        for i in range(1, k):
            out = out + w[:, i] * xc[:, :, i:xc.shape[2] - (k - 1 - i)]
        return out

    def forward(self, u: torch.Tensor, ctx=None) -> torch.Tensor:
        cache = None if ctx is None else ctx.cache
        keep = None if ctx is None or ctx.mask is None or ctx.right_padded else ctx.mask
        b, n, _ = u.shape
        x, z = self.proj_up(u).chunk(2, -1)
        x = x.transpose(1, 2)  # [b, E, n]
        if keep is not None:
            x = x * keep[:, None, :].to(x.dtype)
        key = None if cache is None else slot(ctx, self)
        old = None if cache is None else cache.caches.get(key)
        xc = F.pad(x, (self.k - 1, 0)) if old is None else torch.cat((old[0], x), 2)
        window = None if cache is None else xc[:, :, xc.shape[2] - (self.k - 1):].clone()
        xconv = F.silu(self.short_conv(xc)).transpose(1, 2)  # [b, n, E]
        x = x.transpose(1, 2)
        q, k, v = self.q_proj(xconv), self.k_proj(xconv), self.v_proj(x)
        qkv = torch.cat((q, k, v), -1)
        ig, f = self.igate(qkv).transpose(1, 2), self.fgate(qkv).transpose(1, 2)  # [b, H, n]
        logf = f if self.exp_forget else F.logsigmoid(f)
        if keep is not None:  # a padded position writes nothing and decays nothing
            real = keep[:, None, :]
            ig, logf = ig.masked_fill(~real, float("-inf")), logf * real.to(logf.dtype)
        heads = lambda t: t.view(b, n, self.H, self.dh).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q), heads(k) * self.dh ** -0.5, heads(v)
        if cache is not None:
            step = recurrent_mlstm if n == 1 else (lambda *a, state: chunked_mlstm(*a, state, self.chunk))
            h, state = step(q, k, v, logf, ig, state=None if old is None else old[1:])
            cache.caches[key] = (window, *state)  # flat: C', n', m beside the window
        elif not isinstance(n, int):
            h = parallel_mlstm(q, k, v, logf, ig)
        else:
            h, _ = chunked_mlstm(q, k, v, logf, ig, None, self.chunk)
        h = h - h.mean(-1, keepdim=True)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = h.transpose(1, 2).reshape(b, n, self.E) * self.norm_weight
        return self.proj_down((h + self.skip * xconv) * F.silu(z))


def _state_words(p):
    return "the convolution's last k - 1 inputs [E, k - 1] and per head C' [dh, dh], n' [dh], m: constant in the length"


OP = register(Op(
    decode=_state_words,
    family="rnn", variant="mlstm", params=MLSTMParams, module=MLSTMLayer, causal="yes", shape=mlstm_shape,
    paper="xLSTM: Extended Long Short-Term Memory, Beck et al. 2024, arXiv:2405.04517",
    summary="x, z = W_up u; x_c = swish(conv(x)); C_t = f_t C_(t-1) + exp(i~_t) k_t v_t^T, n_t likewise with k_t; "
            "h_t = q_t C_t / max(|q_t n_t|, 1), max-stabilised; y = W_down((GN(h) + s x_c) swish(z)); causal only; "
            "chunked, O(n C dh + n dh^2) a head",
    cost=mlstm_cost,
))
