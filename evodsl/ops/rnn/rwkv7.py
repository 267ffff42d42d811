"""rnn(rwkv7, head_size=64, chunk=16): RWKV-7 "Goose"'s time mix (Peng et al. 2025, arXiv:2503.14456, Section 4;
BlinkDL's RWKV-v7 x070 code), as a sublayer; d channels in H = d / N heads of N = head_size:

    x_*      = x_t + (x_{t-1} - x_t) mu_*            * in r, w, k, v, a, g: token shift, static lerps (zeros first)
    r, k, v  = W_r x_r, W_k x_k, W_v x_v
    w_t      = exp(-e^-0.5 sigmoid(w0 + tanh(x_w W_1) W_2))             decay per channel, in (0.545, 1)
    a_t      = sigmoid(a0 + x_a A_1 A_2)                                the in-context learning rate per channel
    g        = sigmoid(x_g G_1) G_2                                     the output gate
    kh_t     = normalise_head(k_t * k_k);   k'_t = k_t * (1 + (a_t - 1) k_a)
    S_t      = S_{t-1} (diag(w_t) - kh_t^T (a_t * kh_t)) + v_t^T k'_t,   o_t = S_t r_t      per head, S [N, N]
    out      = W_o ((GroupNorm_H(o) + ((r * k' * r_k) summed per head) v) * g)

Training form: the generalised delta rule, diagonal plus rank one, chunked by the WY / UT transform (_dplr.py:
alpha = a * kh, beta = -kh on the transposed state), a triangular solve for every chunk at once and a loop over
chunks only (T tokens a chunk), exact in float64 (1e-10 against the token recurrence). The per-channel decay ratios
are factorised as exp(B_i) exp(-B_j): with |log w| <= e^-0.5 that stays finite for chunks up to 64 in float32
(chunk is bounded there). Causal only. Step form: the last input [d] and S [H, N, N]. ONNX (a symbolic n): one piece
from a zero state (_dplr.parallel_dplr: [n, n, N] decay ratios a head, the triangle's inverse as a product of 16
factors), not the torch form.

Choices where the paper is silent or which the project makes, as the authors' x070 code: no biases; the value
residual (v mixed with the first layer's v by a LoRA gate) is left out: it needs cross-layer wiring that a sublayer
does not have (every layer here is the paper's layer 0, where v is its own); GroupNorm eps 64e-5 with a learned
scale and shift; LoRA ranks decay 64, a 64, gate 128 (params); the init at mid-depth (their ratios 0.5): mu_r, mu_g
= 1 - (c/d)^0.1, mu_w, mu_a = 1 - (c/d)^0.45, mu_k = 1 - (c/d)^0.45 - 0.2, mu_v = 1 - (c/d)^0.2 - 0.3, w0_c = -6.5 +
5 (c / (d-1))^(0.85 + 0.5^0.5), r_k -0.04, a0 0, k_a 1, k_k a constant 0.85 (ours: the authors vary it by
channel); W_1, A_1, G_1 zero, W_2, A_2, G_2 uniform +-0.1 (their orthogonal init at 0.1 scale, not copied).
Padding: a padded position's input is zeroed before the shift, its key and rank-one term zeroed and its decay 1,
so a padded row equals the sequence alone on either side.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..registry import Op, OpEnv, OpParams, register
from ._dplr import chunked_dplr, parallel_dplr, recurrent_dplr
from ._rwkv7_cost import rwkv7_cost
from ._token_shift import headed_shape, previous, ramp, shift_input

SLOW = math.exp(-0.5)  # the largest -log w_t


class RWKV7Params(OpParams):
    head_size: int = Field(64, ge=1, le=1024, description="N: channels a head (d / N heads, each an N x N state)")
    decay_rank: int = Field(64, ge=1, le=4096, description="the rank of the decay's LoRA")
    a_rank: int = Field(64, ge=1, le=4096, description="the rank of the in-context learning rate's LoRA")
    gate_rank: int = Field(128, ge=1, le=4096, description="the rank of the output gate's LoRA")
    chunk: int = Field(16, ge=1, le=64, description="T: tokens a chunk of the kernel (exp(T e^-0.5) must stay finite "
                       "in float32: at most 64)")
    eps: float = Field(64e-5, gt=0.0, lt=1.0, description="the GroupNorm's eps")


class RWKV7TimeMix(nn.Module):
    def __init__(self, p: RWKV7Params, env: OpEnv):
        super().__init__()
        d, N = env.d, p.head_size
        self.H, self.N, self.chunk = d // N, N, p.chunk
        c = torch.arange(d, dtype=torch.float32)
        self.x_r, self.x_g = nn.Parameter(1 - ramp(d, 0.1)), nn.Parameter(1 - ramp(d, 0.1))
        self.x_w, self.x_a = nn.Parameter(1 - ramp(d, 0.45)), nn.Parameter(1 - ramp(d, 0.45))
        self.x_k = nn.Parameter(1 - ramp(d, 0.45) - 0.2)
        self.x_v = nn.Parameter(1 - ramp(d, 0.2) - 0.3)
        self.w0 = nn.Parameter((-6.5 + 5 * (c / max(d - 1, 1)) ** (0.85 + 0.5 ** 0.5)).reshape(1, 1, d))
        self.w1 = nn.Parameter(torch.zeros(d, p.decay_rank))
        self.w2 = nn.Parameter(torch.empty(p.decay_rank, d).uniform_(-0.1, 0.1))
        self.a0 = nn.Parameter(torch.zeros(1, 1, d))
        self.a1 = nn.Parameter(torch.zeros(d, p.a_rank))
        self.a2 = nn.Parameter(torch.empty(p.a_rank, d).uniform_(-0.1, 0.1))
        self.g1 = nn.Parameter(torch.zeros(d, p.gate_rank))
        self.g2 = nn.Parameter(torch.empty(p.gate_rank, d).uniform_(-0.1, 0.1))
        self.k_k = nn.Parameter(torch.full((1, 1, d), 0.85))
        self.k_a = nn.Parameter(torch.ones(1, 1, d))
        self.r_k = nn.Parameter(torch.full((self.H, N), -0.04))
        self.receptance, self.key, self.value, self.output = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.ln_x = nn.GroupNorm(self.H, d, eps=p.eps)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        x, keep, key, state = shift_input(x, ctx, self)
        b, n, d = x.shape
        H, N = self.H, self.N
        dx = previous(x, None if state is None else state[0]) - x
        xr, xw, xk, xv, xa, xg = (torch.addcmul(x, dx, mu) for mu in (
            self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        logw = -SLOW * torch.sigmoid(self.w0 + torch.tanh(xw @ self.w1) @ self.w2)  # log w_t in (-e^-0.5, 0)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kh = F.normalize((k * self.k_k).view(b, n, H, N), dim=-1).view(b, n, d)
        k = k * (1 + (a - 1) * self.k_a)
        alpha = a * kh
        if keep is not None:
            m = keep[..., None].to(k.dtype)
            k, logw, alpha = k * m, logw * m, alpha * m
        r, k, v, logw, alpha, beta = (t.view(b, n, H, N).transpose(1, 2) for t in (r, k, v, logw, alpha, -kh))
        s0 = None if state is None else state[1]
        if not isinstance(n, int) or torch.compiler.is_exporting():
            o, s = parallel_dplr(r, k, v, logw, alpha, beta), None  # the export (a symbolic n): one piece, zero state
        elif key is not None and n == 1:
            o, s = recurrent_dplr(r, k, v, logw, alpha, beta, s0)
        else:
            o, s = chunked_dplr(r, k, v, logw, alpha, beta, s0, self.chunk)
        if key is not None:
            ctx.cache.caches[key] = (x[:, -1].clone(), s)
        bonus = (r * self.r_k[:, None] * k).sum(-1, keepdim=True) * v  # (r_t . (r_k k'_t)) v_t
        o = self.ln_x(o.transpose(1, 2).reshape(b * n, d)).view(b, n, d) + bonus.transpose(1, 2).reshape(b, n, d)
        return self.output(o * g)


OP = register(Op(
    decode="the last token's input [d] (the shift) and the state S [N, N] of every head: constant in the length",
    family="rnn", variant="rwkv7", params=RWKV7Params, module=RWKV7TimeMix, causal="yes", shape=headed_shape("rnn(rwkv7)"),
    paper='RWKV-7 "Goose" with Expressive Dynamic State Evolution, Peng et al. 2025, arXiv:2503.14456',
    summary="token shift; r, k, v = W x_*; w_t = exp(-e^-0.5 sigmoid(LoRA)); a_t = sigmoid(LoRA); kh = norm(k k_k); "
            "S_t = S_{t-1} (diag(w_t) - kh^T (a kh)) + v^T k'; o = S_t r_t; W_o ((GroupNorm(o) + bonus) LoRA gate); "
            "chunked WY (diagonal plus rank one) O(n T d + n d N)",
    cost=rwkv7_cost, note="",
))
