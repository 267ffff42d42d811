"""rnn(rwkv6, head_size=64, chunk=8): RWKV-6 (Finch)'s time mix (Peng et al. 2024, arXiv:2404.05892, Section 4,
eq. 11-19; BlinkDL's RWKV-v6 code), as a sublayer; d channels in H = d / N heads of N = head_size:

    dx      = x_{t-1} - x_t                                                   token shift (zeros before the first)
    m_*     = tanh((x_t + dx mu_x) A) B_*            * in w, k, v, r, g: one LoRA (A [d, 5 R], B_* [R, d], R = 32)
    x_*     = x_t + dx (mu_* + m_*)                                           ddlerp, data-dependent
    r, k, v = W_r x_r, W_k x_k, W_v x_v;   g = silu(W_g x_g)
    w_t     = exp(-exp(w0 + tanh(x_w D_1) D_2))                               decay per key channel (D_1 [d, 64])
    S_t     = diag(w_t) S_{t-1} + k_t^T v_t,   o_t = r_t (S_{t-1} + diag(u) k_t^T v_t)        per head, S [N, N]
    out     = W_o (GroupNorm_H(o) * g)

Training form: the chunked vector-decay kernel of gated linear attention (attention/_chunked_linear.py, unchanged)
on the queries shifted one token earlier: its o'_t = q_t S_t with q_t = r_{t+1} is r_{t+1} S_t, the r_t S_{t-1}
above one position later (the first position reads the state before, r_0 S_{-1}); the bonus adds (r_t . (u k_t))
v_t. Chunks of T tokens, a loop over chunks only. Any decay is exact: where a chunk's decay is too fast for the
kernel's factorisation exp(B_i) exp(-B_j) (exp(-B) past sqrt(max float)), it takes the ratios exp(B_i - B_j) <= 1
one lag at a time instead (_chunked_linear.DecayScores: no [T, T, N] tensor), so a channel that forgets at once
(exp(w0 + LoRA) of e^3 or more, as trained models have) is computed as such. Causal only. Step form: the last
input [d] and S [H, N, N]. ONNX: the kernel's one-piece form ([n, n, N] decay ratios, a symbolic n only).

Choices where the paper is silent, as the authors' x060 code: no biases; GroupNorm eps 1e-5 * 8^2 with a learned
scale and shift; LoRA ranks 32 (mixes) and 64 (decay); the init at mid-depth (their ratios 0.5): mu = 1 -
(c/d)^0.5 (mu_v 0.15 below it, mu_r and mu_g 1 - (c/d)^0.25), w0_c = -6 + 5 (c / (d-1))^1.35, u_c = 0.5 (1 - c /
(d-1)) + 0.1 ((c+1) mod 3 - 1), A and D_1 zero, B and D_2 uniform +-0.01 (zero A: the mixes' LoRA starts off,
as theirs). Padding: a padded position's input is zeroed before the shift, its key zeroed and its decay 1, so a
padded row equals the sequence alone on either side.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..attention._chunked_linear import chunked_decay, parallel_decay
from ..registry import Op, OpEnv, OpParams, register
from ._rwkv6_cost import rwkv6_cost
from ._token_shift import headed_shape, previous, ramp, shift_input


class RWKV6Params(OpParams):
    head_size: int = Field(64, ge=1, le=1024, description="N: channels a head (d / N heads, each an N x N state)")
    mix_rank: int = Field(32, ge=1, le=4096, description="R: the rank of the five mixes' LoRA")
    decay_rank: int = Field(64, ge=1, le=4096, description="the rank of the decay's LoRA")
    chunk: int = Field(8, ge=1, le=4096, description="T: tokens a chunk of the kernel (the result is the same)")
    eps: float = Field(64e-5, gt=0.0, lt=1.0, description="the GroupNorm's eps")


class RWKV6TimeMix(nn.Module):
    def __init__(self, p: RWKV6Params, env: OpEnv):
        super().__init__()
        d, N, R = env.d, p.head_size, p.mix_rank
        self.H, self.N, self.chunk = d // N, N, p.chunk
        c = torch.arange(d, dtype=torch.float32)
        self.time_maa_x = nn.Parameter(1 - ramp(d, 0.5))
        self.time_maa_w = nn.Parameter(1 - ramp(d, 0.5))
        self.time_maa_k = nn.Parameter(1 - ramp(d, 0.5))
        self.time_maa_v = nn.Parameter(1 - ramp(d, 0.5) - 0.15)
        self.time_maa_r = nn.Parameter(1 - ramp(d, 0.25))
        self.time_maa_g = nn.Parameter(1 - ramp(d, 0.25))
        self.time_maa_w1 = nn.Parameter(torch.zeros(d, 5 * R))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, R, d).uniform_(-0.01, 0.01))
        self.time_decay = nn.Parameter((-6 + 5 * (c / max(d - 1, 1)) ** 1.35).reshape(1, 1, d))
        self.time_decay_w1 = nn.Parameter(torch.zeros(d, p.decay_rank))
        self.time_decay_w2 = nn.Parameter(torch.empty(p.decay_rank, d).uniform_(-0.01, 0.01))
        self.time_faaaa = nn.Parameter((0.5 * (1 - c / max(d - 1, 1)) + 0.1 * ((c + 1) % 3 - 1)).reshape(self.H, N))
        self.receptance, self.key, self.value, self.gate, self.output = (nn.Linear(d, d, bias=False) for _ in range(5))
        self.ln_x = nn.GroupNorm(self.H, d, eps=p.eps)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        x, keep, key, state = shift_input(x, ctx, self)
        b, n, d = x.shape
        H, N = self.H, self.N
        dx = previous(x, None if state is None else state[0]) - x
        lora = torch.tanh(torch.addcmul(x, dx, self.time_maa_x) @ self.time_maa_w1).view(b * n, 5, -1).transpose(0, 1)
        mw, mk, mv, mr, mg = (lora @ self.time_maa_w2).view(5, b, n, d).unbind(0)
        xw, xk, xv, xr, xg = (torch.addcmul(x, dx, mu + m) for mu, m in (
            (self.time_maa_w, mw), (self.time_maa_k, mk), (self.time_maa_v, mv), (self.time_maa_r, mr),
            (self.time_maa_g, mg)))
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        g = F.silu(self.gate(xg))
        logw = -(self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2).exp()  # log w_t <= 0
        if keep is not None:
            k, logw = k * keep[..., None].to(k.dtype), logw * keep[..., None].to(logw.dtype)
        r, k, v, logw = (t.view(b, n, H, N).transpose(1, 2) for t in (r, k, v, logw))  # [b, H, n, N]
        s0 = None if state is None else state[1]
        q = F.pad(r, (0, 0, -1, 1))  # q_t = r_{t+1}: the kernel's q_t S_t is r_{t+1} S_t
        if not isinstance(n, int) or torch.compiler.is_exporting():
            o, s = parallel_decay(q, k, v, logw), None  # the export (a symbolic n): one piece from a zero state
        else:
            o, s = chunked_decay(q, k, v, logw, s0, self.chunk)
        if s0 is None:
            o = F.pad(o, (0, 0, 1, -1))  # one position later; r_0 S_{-1} = 0
        else:
            o = torch.cat((r[:, :, :1] @ s0, o[:, :, :-1]), 2)
        o = o + (r * self.time_faaaa[:, None] * k).sum(-1, keepdim=True) * v  # the bonus (r_t . u k_t) v_t
        if key is not None:
            ctx.cache.caches[key] = (x[:, -1].clone(), s)
        o = self.ln_x(o.transpose(1, 2).reshape(b * n, d)).view(b, n, d)
        return self.output(o * g)


OP = register(Op(
    decode="the last token's input [d] (the shift) and the state S [N, N] of every head: constant in the length",
    family="rnn", variant="rwkv6", params=RWKV6Params, module=RWKV6TimeMix, causal="yes", shape=headed_shape("rnn(rwkv6)"),
    paper="Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence, Peng et al. 2024, arXiv:2404.05892",
    summary="ddlerp token shift (LoRA); r, k, v, g = W x_*; w_t = exp(-exp(w0 + LoRA(x_w))); S_t = diag(w_t) S_{t-1} "
            "+ k_t^T v_t; o_t = r_t (S_{t-1} + diag(u) k_t^T v_t); W_o (GroupNorm(o) silu(g)); chunked O(n T d + n d N)",
    cost=rwkv6_cost, note="",
))
