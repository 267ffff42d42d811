"""ffn(rwkv, d_ff=4d): RWKV's channel-mixing block (Peng et al. 2023, arXiv:2305.13048, eq. 18-20), as a sublayer:

    x'_t  = x_{t-1} (zeros before the first token)                   token shift
    k_t   = relu(W_k (mu_k x_t + (1 - mu_k) x'_t))^2                   [d_ff]
    out_t = sigmoid(W_r (mu_r x_t + (1 - mu_r) x'_t)) * W_v k_t

Unlike a position-wise FFN it reads the previous token, so it is causal: in a bidirectional model too it reads only
the past (there is no other form). Step form: the last token's input [d]. Choices where the paper is silent, as HF's
RwkvFeedForward and the authors' code: no biases; the mixes stored [1, 1, d]; their init, lacking the layer's depth,
the authors' at mid-depth: mu_k = mu_r = (c / d)^0.5. Padding: a padded position's input is zeroed before the shift,
so the first real token of a left-padded row reads zeros, as alone.
"""
from __future__ import annotations

import sympy as sp
import torch
from pydantic import Field
from torch import nn

from ..cost import Cost, linear
from ..registry import Op, OpEnv, OpParams, register, sequence_shape
from ..rnn._token_shift import mix, previous, shift_input


class RWKVFFNParams(OpParams):
    d_ff: int | None = Field(None, ge=1, description="hidden width; default 4 * d_model")


def mid_depth_mix(d: int) -> torch.Tensor:
    return (torch.arange(d, dtype=torch.float32) / d).pow(0.5).reshape(1, 1, d)


class RWKVChannelMix(nn.Module):
    def __init__(self, p: RWKVFFNParams, env: OpEnv):
        super().__init__()
        d, f = env.d, p.d_ff or 4 * env.d
        self.time_mix_key = nn.Parameter(mid_depth_mix(d))
        self.time_mix_receptance = nn.Parameter(mid_depth_mix(d))
        self.key = nn.Linear(d, f, bias=False)
        self.receptance = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        x, _, key, state = shift_input(x, ctx, self)
        prev = previous(x, None if state is None else state[0])
        if key is not None:
            ctx.cache.caches[key] = (x[:, -1].clone(),)
        k = torch.relu(self.key(mix(x, prev, self.time_mix_key))).square()
        return torch.sigmoid(self.receptance(mix(x, prev, self.time_mix_receptance))) * self.value(k)


def cost(p: RWKVFFNParams, env: OpEnv, s) -> Cost:
    """Three linears (W_k, W_v on d_ff, W_r); FLOPs outside them (a convention): 3 t d a mix (sub, mul, add), 2 t f
    for relu and the square, 5 t d for sigmoid and the gate; backward twice that.
    Kept for backward (tD = t d, tF = t d_ff elements): the two mixes and the two differences x - x' (for the mixes'
    gradients), sigmoid's output and W_v's, 6 tD; relu's output and its square, 2 tF (not the input: only its
    differences are kept). Inference peak: the three d-wide temporaries of a mix beside W_k's output, or W_k's output
    and its square. Backward's peak (measured by the storage tracker, net of what it has released): the largest of
    2 tD, tD + tF and 3 tF - 2 tD."""
    f = s.sym("f", p.d_ff or 4 * env.d)
    t = s.b * s.n
    D, F = t * s.d, t * f
    c = linear(s, s.d, f, False) + linear(s, f, s.d, False) + linear(s, s.d, s.d, False)
    other = 6 * t * s.d + 2 * t * f + 5 * t * s.d
    return Cost(params=c.params + 2 * s.d, fwd=c.fwd, bwd=c.bwd, fwd_other=other, bwd_other=2 * other,
                saves_input=False, saved=(6 * D + 2 * F) * s.bytes, peak=sp.Max(3 * D + F, 2 * F) * s.bytes,
                bwd_peak=sp.Max(2 * D, D + F, 3 * F - 2 * D) * s.bytes, cache=s.b * s.d * s.bytes)


OP = register(Op(
    decode="the last token's input [d] (the token shift): constant",
    family="ffn", variant="rwkv", params=RWKVFFNParams, module=RWKVChannelMix, causal="yes", shape=sequence_shape,
    paper="RWKV: Reinventing RNNs for the Transformer Era, Peng et al. 2023, arXiv:2305.13048",
    summary="k = relu(W_k (mu_k x_t + (1 - mu_k) x_{t-1}))^2; sigmoid(W_r (mu_r x_t + (1 - mu_r) x_{t-1})) * W_v k",
    cost=cost, note="LongConv/008.md",
))
