"""mha(exp_smoothing, alpha=a): ETSformer's exponential smoothing attention (ESA; Woo, Liu, Sahoo, Kumar, Hoi 2022,
arXiv:2202.01381, section 3.2), multi-head.

Per head, values V = x W_v (heads of width dh), a smoothing parameter 0 < alpha < 1 and a learned initial state v_0
in R^dh; output t (t = 1..n) is the exponentially weighted average of the values so far and the initial state:

    o_t = sum_{j=1..t} alpha (1 - alpha)^(t-j) V_j + (1 - alpha)^t v_0,     y = [o^1 .. o^h] W_o

(the paper's A_ES [v_0; V], equivalently the recurrence o_t = alpha V_j + (1 - alpha) o_{t-1}, o_0 = v_0).
Choices where the paper is silent or leaves it to the model: alpha is one per head, learned as sigmoid of a free
logit (the authors' and lucidrains' code: alpha a parameter per head), or fixed for every head with alpha=a; v_0 is
one learned vector per head (zero-initialised); the output projection W_o joins the heads as multi-head attention's.
ETSformer applies ESA to the level and to the growth (successive differences) of its series: what the op is fed is
the block's business (the spec); the op is the smoothing.

How it runs (measured, this 2-core CPU under load, float32 forward, b 1, d 512, 8 heads, one thread, best of 5):
the paper's FFT convolution over 2n points took 24 ms at n = 1024 and 406 ms at n = 8192, a step-by-step scan
(o = alpha V_t + (1 - alpha) o, n torch steps) 43 and 268 ms, and the chunked form 12.5 and 208 ms: the chunked form
runs. In chunks of C = 64 tokens, each chunk's own values meet a [C, C] lower-triangular kernel alpha (1 -
alpha)^(i-j) in one matmul, and the output at the end of the chunk before is carried in, decayed by (1 -
alpha)^(i+1) at row i (a loop over the ceil(n / C) chunks): O(n C d) time, no n x n tensor. A symbolic n (the ONNX
export, where that loop cannot be traced) runs the dense form, one [n, n] kernel matmul per head (the FFT's ONNX
DFT with a symbolic length failed in onnxruntime here). The decoding step is the recurrence: the state is o_t
(h dh numbers a row); the initial state's term, (1 - alpha)^(t+1) v_0, is added apart from the chunks.
Causal by construction; the paper gives no bidirectional form, so a bidirectional model is refused. Padding:
padded values are zeroed, and the initial state's term is counted from each row's first token ((1 - alpha)^(t -
first + 1)), so left and right padding both give each sequence alone. No position scheme (the decay is one);
no weights between positions are formed (nothing for dropout).
"""
from __future__ import annotations

import torch
from pydantic import Field
import torch.nn.functional as F
from torch import nn

from ...decode import slot
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register
from ._exp_smoothing_cost import CHUNK, exp_smoothing_cost


class ExpSmoothingParams(OpParams):
    heads: int = Field(8, ge=1, le=4096, description="heads, each with its own alpha and initial state")
    head_dim: int | None = Field(None, ge=1, le=4096, description="width of one head; default d_model / heads")
    alpha: float | None = Field(None, gt=0.0, lt=1.0, description="the smoothing parameter of every head; default: "
                                                                  "learned, one per head")
    bias: bool = Field(True, description="biases on the value and output projections")


def exp_smoothing_shape(p: ExpSmoothingParams, env: OpEnv):
    if len(env.shape) != 3 or not isinstance(env.d, int):
        raise ShapeProblem(f"mha(exp_smoothing) needs a [b, n, d] stream, got [{', '.join(map(str, env.shape))}]")
    if not env.causal:
        raise ShapeProblem("mha(exp_smoothing) is causal only: each output smooths the values before it, and the "
                           "paper gives no bidirectional form", hint="use it in a causal model (causal=true)")
    if p.head_dim is None and env.d % p.heads:
        raise ShapeProblem(f"d_model {env.d} is not divisible by heads={p.heads}", "heads",
                           "d_model % heads must be 0, or set head_dim")
    return env.shape


class ExpSmoothingAttention(nn.Module):
    def __init__(self, p: ExpSmoothingParams, env: OpEnv):
        super().__init__()
        self.heads = p.heads
        self.head_dim = p.head_dim or env.d // p.heads
        width = self.heads * self.head_dim
        self.v_proj = nn.Linear(env.d, width, bias=p.bias)
        self.o_proj = nn.Linear(width, env.d, bias=p.bias)
        self.initial = nn.Parameter(torch.zeros(self.heads, self.head_dim))  # v_0 of each head
        self.fixed = p.alpha
        self.alpha_logit = nn.Parameter(torch.zeros(self.heads)) if p.alpha is None else None
        self.chunk = CHUNK

    def log_keep(self, dtype) -> torch.Tensor:
        """log(1 - alpha) and alpha per head [h], in `dtype`."""
        if self.alpha_logit is None:
            a = torch.full((self.heads,), self.fixed, dtype=dtype, device=self.initial.device)
        else:
            a = torch.sigmoid(self.alpha_logit.to(dtype))
        return torch.log1p(-a), a

    def smooth(self, v: torch.Tensor, state: torch.Tensor, first=None) -> torch.Tensor:
        """v [b, n, h, dh] (zero where padded) and the state before position 0 (v_0 [h, dh], or a decoding state
        [b, h, dh]) -> o [b, n, h, dh]: the smoothed values (chunked, or dense for a symbolic n), plus the state
        decayed by (1 - alpha)^(t + 1 - first) (first [b, 1]: each row's first token; None: 0; none before it)."""
        n = v.shape[1]
        work = torch.promote_types(v.dtype, torch.float32)
        log_keep, a = self.log_keep(work)
        o = self._chunked(v.to(work), log_keep, a) if isinstance(n, int) else self._dense(v.to(work), log_keep, a)
        t = torch.arange(n, device=v.device, dtype=work)
        steps = (t + 1)[None, :] if first is None else t[None, :] + 1 - first  # [1 | b, n]
        decay = torch.exp(steps.clamp(min=0)[..., None] * log_keep) * (steps > 0)[..., None]  # [1 | b, n, h]
        state = state.to(work) if state.dim() == 2 else state.to(work)[:, None]
        return (o + decay[..., None] * state).to(v.dtype)

    def _chunked(self, v, log_keep, a):
        """sum_{j<=t} alpha (1 - alpha)^(t-j) V_j in chunks of C: each chunk's own values by a [C, C] matmul with the
        lower-triangular kernel (per head, the batch's chunks side by side as its columns), and the running output at
        the end of the chunk before carried in, decayed by (1 - alpha)^(i+1) at row i (a loop over the ceil(n / C)
        chunks): O(n C d)."""
        b, n, h, dh = v.shape
        C = min(self.chunk, n)
        m = -(-n // C)
        i = torch.arange(C, device=v.device, dtype=v.dtype)
        lag = i[:, None] - i[None, :]
        kernel = a[:, None, None] * torch.exp(lag.clamp(min=0) * log_keep[:, None, None]) * (lag >= 0)  # [h, C, C]
        cols = F.pad(v, (0, 0, 0, 0, 0, m * C - n)).view(b, m, C, h, dh).permute(3, 2, 0, 1, 4)  # [h, C, b, m, dh]
        inner = (kernel @ cols.reshape(h, C, b * m * dh)).view(h, C, b, m, dh).to(v.dtype)  # (autocast's matmul)
        carry_decay = torch.exp((i + 1)[:, None] * log_keep).T[:, :, None, None]  # [h, C, 1, 1]
        chunks = inner.unbind(3)  # [h, C, b, dh] each
        out = [chunks[0]]
        for k in range(1, m):
            out.append(chunks[k] + carry_decay * out[-1][:, -1:])
        return torch.stack(out, 3).permute(2, 3, 1, 0, 4).reshape(b, m * C, h, dh)[:, :n]

    @staticmethod
    def _dense(v, log_keep, a):
        """The same sums as one [n, n] lower-triangular matmul per head: the export's form (a symbolic n, no loop)."""
        n = v.shape[1]
        t = torch.arange(n, device=v.device, dtype=v.dtype)
        lag = t[:, None] - t[None, :]
        kernel = a[:, None, None] * torch.exp(lag.clamp(min=0) * log_keep[:, None, None]) * (lag >= 0)  # [h, n, n]
        return (kernel @ v.transpose(1, 2)).transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        b, n, _ = x.shape
        v = self.v_proj(x).view(b, n, self.heads, self.head_dim)
        cache = ctx.cache if ctx is not None else None
        if cache is not None:  # decoding: the state is the last output (o_t), v_0 before the first token
            state = cache.caches.get(slot(ctx, self))
            o = self.smooth(v, self.initial if state is None else state[0])
            cache.caches[slot(ctx, self)] = (o[:, -1].clone(),)
            return self.o_proj(o.reshape(b, n, -1))
        first = None
        if ctx is not None and ctx.mask is not None:  # padded values zeroed; v_0 decays from each row's first token
            v = v * ctx.mask[:, :, None, None].to(v.dtype)
            first = (ctx.mask.cumsum(1) == 0).sum(1, keepdim=True)
        return self.o_proj(self.smooth(v, self.initial, first).reshape(b, n, -1))


OP = register(Op(
    decode="the last output of every head (h dh numbers a row): o_t = alpha V_t + (1 - alpha) o_(t-1)",
    family="mha", variant="exp_smoothing", params=ExpSmoothingParams, module=ExpSmoothingAttention,
    causal="yes", shape=exp_smoothing_shape, supports=frozenset(),
    paper="ETSformer: Exponential Smoothing Transformers for Time-series Forecasting, Woo et al. 2022, "
          "arXiv:2202.01381",
    summary="o_t = sum_{j<=t} alpha (1-alpha)^(t-j) V_j + (1-alpha)^t v_0 per head (alpha learned or fixed, v_0 "
            "learned); causal only; FFT convolution, O(n d log n)",
    note="MHA/Others/010.md", cost=exp_smoothing_cost,
))
