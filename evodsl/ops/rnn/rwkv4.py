"""rnn(rwkv4, chunk=16): RWKV-4's time-mixing block (Peng et al. 2023, arXiv:2305.13048, Section 4.1 and eq. 13-17),
as a sublayer (the block's LayerNorm and residual are the model's); C = d channels:

    x'_t   = x_{t-1} (zeros before the first token)                    token shift
    k_t    = W_k (mu_k x_t + (1 - mu_k) x'_t),  v_t, r_t the same with mu_v, mu_r and W_v, W_r
    wkv_t  = (sum_{i<t} e^{-(t-1-i) w + k_i} v_i + e^{u + k_t} v_t) / (sum_{i<t} e^{-(t-1-i) w + k_i} + e^{u + k_t})
    out_t  = W_o (sigmoid(r_t) * wkv_t)

per channel, with the decay w = exp(time_decay) > 0 and the bonus u = time_first (HF's RwkvSelfAttention and the
authors' code; e^{-w} is the factor a step). Training form: the WKV chunked (_wkv.py), chunks of T tokens in a loop,
inside each a [T, T] table of log-weights a channel, stabilised by a running max (the result does not depend on T).
Causal only: the recurrence is the op. Step form: the last token's input [d] for the shift and WKV's (num, den, max)
[C] each: a constant state; a prefill and a single step run the same code from it. The ONNX export (a symbolic n)
runs the whole sequence as one chunk (its [n, n] table a channel: quadratic, exact).

Choices where the paper is silent: no biases (as the paper and HF); the WKV runs in float32 at least (HF's .float());
the init, lacking the layer's depth, is the authors' at mid-depth (their ratio 0.5): time_decay_c = -5 + 8 (c / (C -
1))^1.35, time_first = log 0.3 + 0.5 ((c + 1) mod 3 - 1), mu_k = (c / d)^0.5, mu_v = mu_k + 0.15, mu_r = (c / d)^0.25;
the mixes are stored [1, 1, d], as HF. Padding: a padded position's input is zeroed before the shift and its key
set to the dtype's min / 4 (its weight e^{k} is exactly 0 beside a real token's), so a padded row equals the sequence
alone on either side (between real tokens, the decay would still count the padded steps).
"""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from ..registry import Op, OpEnv, OpParams, ShapeProblem, register, sequence_shape
from ._rwkv4_cost import rwkv4_cost
from ._token_shift import mix, previous, shift_input
from ._wkv import chunk_wkv, wkv


class RWKV4Params(OpParams):
    chunk: int = Field(16, ge=1, le=4096, description="T: tokens per chunk of the WKV (the result is the same)")


def rwkv4_shape(p: RWKV4Params, env: OpEnv):
    shape = sequence_shape(p, env)
    if not env.causal:
        raise ShapeProblem("rnn(rwkv4) is causal only: its recurrence runs forward in time", None,
                           "use it in a causal model (head(lm)), or a mixer for a bidirectional one")
    return shape


def mid_depth_mix(d: int, power: float) -> torch.Tensor:
    return (torch.arange(d, dtype=torch.float32) / d).pow(power).reshape(1, 1, d)


class RWKV4TimeMix(nn.Module):
    def __init__(self, p: RWKV4Params, env: OpEnv):
        super().__init__()
        d = C = env.d
        self.chunk = p.chunk
        c = torch.arange(C, dtype=torch.float32)
        self.time_decay = nn.Parameter(-5 + 8 * (c / max(C - 1, 1)) ** 1.35)
        self.time_first = nn.Parameter(math.log(0.3) + 0.5 * ((c + 1) % 3 - 1))
        self.time_mix_key = nn.Parameter(mid_depth_mix(d, 0.5))
        self.time_mix_value = nn.Parameter(mid_depth_mix(d, 0.5) + 0.15)
        self.time_mix_receptance = nn.Parameter(mid_depth_mix(d, 0.25))
        self.key, self.value, self.receptance = (nn.Linear(d, C, bias=False) for _ in range(3))
        self.output = nn.Linear(C, d, bias=False)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        x, keep, key, state = shift_input(x, ctx, self)
        prev = previous(x, None if state is None else state[0])
        k = self.key(mix(x, prev, self.time_mix_key))
        v = self.value(mix(x, prev, self.time_mix_value))
        r = torch.sigmoid(self.receptance(mix(x, prev, self.time_mix_receptance)))
        del prev
        dtype = torch.promote_types(k.dtype, torch.float32)
        k, v = k.to(dtype), v.to(dtype)
        if keep is not None:
            k = k.masked_fill(~keep[..., None], torch.finfo(dtype).min / 4)
        w, u = -self.time_decay.to(dtype).exp(), self.time_first.to(dtype)
        carry = None if state is None else state[1:]
        if not isinstance(x.shape[1], int) or torch.compiler.is_exporting():
            y, carry = chunk_wkv(w, u, k, v, carry)  # the export: one chunk over the symbolic n
        else:
            y, carry = wkv(w, u, k, v, carry, self.chunk)
        if key is not None:
            ctx.cache.caches[key] = (x[:, -1].clone(), *carry)
        return self.output(r * y.to(r.dtype))


OP = register(Op(
    decode="the last token's input [d] (the shift) and WKV's numerator, denominator and max [C] each: constant",
    family="rnn", variant="rwkv4", params=RWKV4Params, module=RWKV4TimeMix, causal="yes", shape=rwkv4_shape,
    paper="RWKV: Reinventing RNNs for the Transformer Era, Peng et al. 2023, arXiv:2305.13048",
    summary="k, v, r = W (mu x_t + (1 - mu) x_{t-1}); wkv_t = (sum_{i<t} e^{-(t-1-i)w + k_i} v_i + e^{u+k_t} v_t) / "
            "(same with 1); out = W_o (sigmoid(r) wkv); chunked O(n T d)",
    cost=rwkv4_cost, note="LongConv/008.md",
))
