"""mha(forgetting): the Forgetting Transformer's Forgetting Attention (FoX; Lin, Nikishin, He, Courville 2025,
arXiv:2503.02130); with pro=true (or kv_shift=, qk_norm=, output_norm=, output_gate=) the Pro block's extras,
whose equations and choices _forgetting_pro.py states.

Each head has a scalar, data-dependent forget gate per token, f_t = sigmoid(w_f . x_t + b_f) (w_f in R^d, one
per query head: the paper's fgate projection [d -> h]), and the scores are decayed by the product of the gates
between key and query:

    o_i = sum_{j <= i} softmax_j( q_i . k_j / sqrt(dh) + D_i - D_j ) v_j,    D_i = sum_{l <= i} log f_l

(D_i - D_j = sum_{l = j+1..i} log f_l <= 0). No position embedding is needed (the decay is one); none is
supported inside. Causal only: the paper gives no bidirectional form, and a bidirectional model is refused.

How it runs (our choice, exact in exact arithmetic): D_i is constant along a query's row, and softmax does not
see a constant, so the bias reduces to -D_j, a term of the key alone. It is folded into the dot product with one
extra column, q'_i = [q_i, sqrt(dh)], k'_j = [k_j, -D_j], v'_j = [v_j, 0]: q'_i . k'_j / sqrt(dh) = q_i . k_j /
sqrt(dh) - D_j. One fused F.scaled_dot_product_attention call (is_causal, flash on CPU: no n x n tensor, its
backward recomputes the weights) over width dh + 1, the output's extra column (zero) dropped. On CUDA the widths
are zero-padded to a multiple of 8, which its flash and memory-efficient kernels need (else SDPA would fall back to
its n x n math kernel); that path is checked on the CPU (forced), not on a GPU, and the cost declares the CPU's. The gates are per
query head, so under grouped K/V heads (kv_heads < heads) k' and v' are expanded to the query heads. Numerics: log f
and D are float32 at least (the authors' kernel cumsums log f in float32), and the score carries an absolute error
of about |D_j| times float32's epsilon (4.6e-5 against float64 at n = 2000 with gates near 1/2, where softmax
attention's is 2e-7). A 16-bit column would round D_j to |D_j| 2^-9, so 16-bit inputs take two columns, -D_j
rounded to the dtype and the remainder (width dh + 2; the kernel accumulates in float32): within 2x of softmax
attention's own 16-bit error (tests/ops/test_forgetting.py).
Padding: a padded key is masked (a bool [b, 1, n, n] mask, as mha(softmax)'s, only under left padding); the
gates of padded positions never lie between two tokens of the same row, so padding changes nothing a token reads.
Decoding keeps the K/V cache (kv_heads heads) and D of every cached position (h heads); a new token continues D
from the last. dropout= is refused (the fused kernel's weights are never formed).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...decode import slot
from ..registry import Op, OpEnv, ShapeProblem, register
from ._common import AttentionBase, AttentionParams, attention_shape
from ._forgetting_cost import forgetting_cost
from ._forgetting_pro import Pro, flags


class ForgettingParams(AttentionParams):
    pro: bool = Field(False, description="the Pro block: kv_shift, qk_norm, output_norm and output_gate all on")
    kv_shift: bool = Field(False, description="k_t = a_t k~_{t-1} + (1 - a_t) k~_t, a_t = sigmoid(w . x_t) per "
                                              "K/V head; the same for v")
    qk_norm: bool = Field(False, description="RMSNorm of each head's q and k, a gain per channel")
    output_norm: bool = Field(False, description="RMSNorm of each head's output, a gain per channel")
    output_gate: bool = Field(False, description="o * sigmoid(W_g x) before o_proj")


def forgetting_shape(p: ForgettingParams, env: OpEnv):
    if not env.causal:
        raise ShapeProblem("mha(forgetting) is causal only: its forget gates decay the scores of the past, and the "
                           "paper gives no bidirectional form", hint="use it in a causal model (causal=true), or "
                           "mha(softmax) here")
    if p.dropout:
        raise ShapeProblem("mha(forgetting) runs the fused kernel, which never forms the weights to drop out",
                           "dropout", "remove dropout=, or put dropout(standard) on the stream")
    return attention_shape(p, env)


class ForgettingAttention(AttentionBase):
    def __init__(self, p: ForgettingParams, env: OpEnv):
        super().__init__(p, env)
        self.fgate = nn.Linear(env.d, self.heads, bias=True)  # w_f, b_f of each head
        self.align = None  # the width q', k', v' are padded to a multiple of: None, 8 on CUDA (the fused kernels)
        self.pro = Pro(p, env.d, self.heads, self.kv_heads, self.head_dim) if any(flags(p).values()) else None

    def extended(self, q, k, v, D):
        """q' [b, h, n, dh + c], k', v' [b, h, N, dh + c] (laid out [b, n, h, dh + c]) from q [b, n, h, dh], k, v
        [b, N, kv_heads, dh] and D [b, N, h] (the queries are the last n of the N positions): c = 1 column, -D, or
        for 16-bit inputs 2, -D split into its rounding to the dtype and the remainder (D is float32)."""
        g = self.heads // self.kv_heads
        if g > 1:
            k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
        if D.dtype == q.dtype:
            col = -D[..., None]
        else:
            hi = D.to(q.dtype)
            col = torch.stack((-hi, (hi.to(D.dtype) - D).to(q.dtype)), -1)
        c = col.shape[-1]
        align = self.align or (8 if q.is_cuda else 1)  # CUDA's flash and memory-efficient kernels take widths in
        pad = -(self.head_dim + c) % align  # multiples of 8 only, else SDPA falls back to its n x n math kernel
        ones = q.new_full((*q.shape[:-1], c), math.sqrt(self.head_dim))
        if pad:  # zero columns past the extra ones: nothing added
            ones, col = F.pad(ones, (0, pad)), F.pad(col, (0, pad))
        q = torch.cat((q, ones), -1)
        del ones
        k = torch.cat((k, col), -1)
        return q.transpose(1, 2), k.transpose(1, 2), F.pad(v, (0, c + pad)).transpose(1, 2)

    def project(self, x: torch.Tensor, mask=None, prev=None):
        """q [b, n, h, dh], k, v [b, n, kv_heads, dh], log f [b, n, h], and the Pro block's shift state (None
        without kv_shift); mask, prev: the padding and the previous shift state, for kv_shift."""
        b, n, _ = x.shape
        precise = torch.promote_types(x.dtype, torch.float32)  # the gates and D in float32 at least
        q, k, v = (self.q_proj(x).view(b, n, self.heads, self.head_dim),
                   self.k_proj(x).view(b, n, self.kv_heads, self.head_dim),
                   self.v_proj(x).view(b, n, self.kv_heads, self.head_dim))
        last = None
        if self.pro is not None:
            q, k, v, last = self.pro.keys(x, q, k, v, mask, prev)
        return q, k, v, F.logsigmoid(self.fgate(x).to(precise)), last

    def finish(self, x, o):
        """o' [b, h, n, dh + c] -> the output: the extra columns cut, the Pro block's norm and gate, o_proj."""
        o = o[..., :self.head_dim]
        return self.out(o if self.pro is None else self.pro.output(x, o))

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        q, k, v, log_f, _ = self.project(x, None if ctx is None else ctx.mask)
        q, k, v = self.extended(q, k, v, log_f.cumsum(1))
        del log_f
        allowed = self.allowed(ctx, x.shape[1], x.device)  # left padding only (None: the causal flash path)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=allowed is None,
                                           scale=1 / math.sqrt(self.head_dim))
        del q, k, v, allowed
        return self.finish(x, o)

    def _step(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """Decoding: D continues from the last cached position; the new queries read the cache and themselves.
        The cache: k, v [b, t, kv_heads, dh] and D [b, t, h] of the t positions so far; with kv_shift, the last
        position's unshifted k~, v~ [b, 1, kv_heads, dh] too."""
        T = x.shape[1]
        old = ctx.cache.caches.get(slot(ctx, self))
        q, k, v, log_f, last = self.project(x, prev=None if old is None else old[3:])
        D = log_f.cumsum(1)
        if old is not None:
            D = D + old[2][:, -1:]
            k, v, D = (torch.cat((a, c), 1) for a, c in zip(old, (k, v, D)))
        ctx.cache.caches[slot(ctx, self)] = (k, v, D) + (last or ())
        start = k.shape[1] - T
        keep = torch.arange(start + T, device=x.device)[None, :] <= torch.arange(start, start + T, device=x.device)[:, None]
        q, k, v = self.extended(q, k, v, D)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=1 / math.sqrt(self.head_dim))
        return self.finish(x, o)


OP = register(Op(
    decode=lambda p: ("the K/V cache (kv_heads heads) and D, the cumulative log forget gate, of every position so far "
                      "(h heads)" + (", and the last position's unshifted k, v (kv_shift)" if flags(p)["kv_shift"] else "")),
    family="mha", variant="forgetting", params=ForgettingParams, module=ForgettingAttention,
    causal="yes", shape=forgetting_shape, supports=frozenset(),
    paper="Forgetting Transformer: Softmax Attention with a Forget Gate, Lin et al. 2025, arXiv:2503.02130",
    summary="softmax(q_i.k_j/sqrt(dh) + sum_{l=j+1..i} log f_l) v, f_t = sigmoid(w_f.x_t + b_f) per head; causal "
            "only; one fused SDPA call over [q, sqrt(dh)].[k, -D_j]; pro=true: KV-shift, QK-norm, output norm and "
            "gate (FoX Pro); O(n^2 d)",
    note="", cost=forgetting_cost,
))
