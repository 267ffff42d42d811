"""mha(momentum, beta=0.6, gamma=1, eps=1e-6): Momentum Transformer (Nguyen et al. 2022), heavy-ball momentum on
linear attention's state.

Per head, with mha(linear)'s feature map phi(x) = elu(x) + 1 on q and k, the paper's recurrence

    m_i = beta m_{i-1} - phi(k_i) v_i^T,     S_i = S_{i-1} - gamma m_i,     z_i = z_{i-1} + phi(k_i)
    o_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps)

unrolled: S_i = g sum_{j <= i} (1 - beta^(i-j+1)) phi(k_j) v_j^T with g = gamma / (1 - beta), i.e. linear
attention whose key j weighs g (1 - beta^(i-j+1)) at query i (a relative position weight growing from g (1 - beta)
to g); the denominator keeps the plain sums z_i. beta = 0, gamma = 1 is mha(linear). Bidirectional (the
authors' encoder form): every query reads the final state S_n, key j weighing g (1 - beta^(n-j+1)).

The causal form runs in chunks of C tokens: within a chunk the C x C products phi(q_i)^T phi(k_j) weighed by
g (1 - beta^(i-j+1)) (j <= i); across chunks two states, the plain sum S of the earlier chunks' phi(k) v^T (an
exclusive cumulative sum over chunks) and the momentum P_t = sum_{j < t} beta^(t-1-j) phi(k_j) v_j^T (a decayed
cumulative sum over chunks, by doubling: log2(n / C) shifted adds), read as g (phi(q_i)^T S - beta^(i-t+2)
phi(q_i)^T P) by the chunk starting at t. O(n C dh + (n / C) dh^2 log(n / C)), no n x n tensor. The export (a
symbolic n) runs the same per position, O(n dh^2) memory (up to 20 doubling steps: 2^20 positions). Decoding
keeps S, P and z per K/V head. (The authors' causal code weighs key j by 1 - beta^(n-j+1) for every query, the
last query's weights; this follows the paper's recurrence.) Padding: padded keys add nothing; weights count real
tokens (bidirectional: those from j to the end). No position scheme inside; the adaptive-momentum variant is not
built.
"""
from __future__ import annotations

import sympy as sp
import torch
import torch.nn.functional as F
from pydantic import Field

from ...decode import slot
from ..cost import Cost, Symbols
from ..registry import Op, OpEnv, register
from ._common import AttentionBase, AttentionParams, attention_cost, head_symbols, weightless_shape

EXPORT_STEPS = 20  # doubling steps of the export's decayed sums: sequences up to 2^20 positions


class MomentumParams(AttentionParams):
    beta: float = Field(0.6, ge=0.0, lt=1.0, description="momentum: m_i = beta m_{i-1} - phi(k_i) v_i^T")
    gamma: float = Field(1.0, gt=0.0, le=1e3, description="step size: S_i = S_{i-1} - gamma m_i")
    eps: float = Field(1e-6, ge=0.0, description="added to the denominator phi(q_i)^T z_i")


def shifted(x: torch.Tensor, s: int) -> torch.Tensor:
    """x [b, h, L, ...] moved s places along dim 2, zeros first (a symbolic L: any s)."""
    n = x.shape[2]  # padded by at most n (sym_min: a graph for every n), the first n kept
    return F.pad(x, (0, 0) * (x.dim() - 3) + (torch.sym_min(s, n), 0))[:, :, :n]


def decayed_cumsum(x: torch.Tensor, decay: float, steps: int) -> torch.Tensor:
    """y_t = sum_{u <= t} decay^(t-u) x_u along dim 2 by doubling: after step k, y_t sums 2^k terms."""
    for k in range(steps):
        x = x + shifted(x, 1 << k) * decay ** (1 << k)
    return x


class MomentumAttention(AttentionBase):
    chunk = 64  # C, tokens per chunk of the causal form

    def __init__(self, p: MomentumParams, env: OpEnv):
        super().__init__(p, env)
        self.beta, self.eps, self.g = p.beta, p.eps, p.gamma / (1.0 - p.beta)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        q, k, v = self.qkv(x)
        key_mask = self.key_mask(ctx)
        keep = None if key_mask is None else key_mask[:, None, :, None].to(q.dtype)  # padded keys add nothing
        if not self.causal:
            return self.out(self._bidirectional(q, k, v, key_mask, keep))
        k, v = self.expand_kv(k), self.expand_kv(v)
        n = x.shape[1]
        if not isinstance(n, int) or torch.jit.is_tracing():
            fq, fk = F.elu(q) + 1, F.elu(k) + 1
            fk = fk if keep is None else fk * keep
            return self.out(self._prefix_sums(fq, fk, v).div_(self._den(fq, fk)))
        return self.out(self._chunked(q, k, v, keep))

    def _den(self, fq, fk):
        """(phi(q_i)^T z_i + eps) / g, z_i the plain sums of phi(k_j), j <= i (o = g num / den)."""
        return (fq * fk.cumsum(-2)).sum(-1, keepdim=True).add_(self.eps).div_(self.g)

    def _bidirectional(self, q, k, v, key_mask, keep):
        fq, fk = F.elu(q) + 1, F.elu(k) + 1
        n = fk.shape[2]
        # key j weighs g (1 - beta^e_j), e_j the real tokens from j to the end
        e = (torch.arange(n, 0, -1, device=fk.device)[:, None] if key_mask is None
             else key_mask.flip(-1).cumsum(-1).flip(-1)[:, None, :, None]).to(fk.dtype)
        w = (1.0 - self.beta ** e).mul_(self.g)
        if keep is not None:
            fk, w = fk * keep, w * keep
        s = (fk * w).transpose(-1, -2) @ v  # [b, kv, dh, dh]
        den = (fq * self.expand_kv(fk.sum(-2, keepdim=True))).sum(-1, keepdim=True).add_(self.eps)  # [b, h, n, 1]
        return (fq @ self.expand_kv(s)).div_(den)

    def _chunk_weights(self, c: int, device, dtype):
        """(1 - beta^(i-j+1)) for j <= i < C, 0 above the diagonal: [C, C]."""
        r = torch.arange(c, device=device)
        delta = (r[:, None] - r[None, :]).to(dtype)
        return (1.0 - self.beta ** (delta + 1)).masked_fill_(delta < 0, 0.0)

    def _chunked(self, q, k, v, keep):
        """The output (before o_proj) in chunks of C tokens (see the module's docstring): q, and k, v at the
        query heads, [b, h, n, dh]; keep [b, 1, n, 1] or None."""
        b, h, n, dh = q.shape
        c = min(self.chunk, n)
        pad = -n % c
        m = (n + pad) // c

        def chunked(t):  # one copy, padded, in the layout the chunked matmuls read as views
            return (F.pad(t, (0, 0, 0, pad)) if pad else t.contiguous()).view(b, -1, m, c, t.shape[-1])

        fq, fk, v = F.elu(chunked(q)) + 1, F.elu(chunked(k)) + 1, chunked(v)
        if keep is not None:
            fk = fk * chunked(keep)
        den = self._den(fq.view(b, h, m * c, dh), fk.view(b, h, m * c, dh)).view(b, h, m, c, 1)
        r = torch.arange(c, device=q.device, dtype=q.dtype)
        a = (fq @ fk.transpose(-1, -2)).mul_(self._chunk_weights(c, q.device, q.dtype))
        s = F.pad((fk.transpose(-1, -2) @ v).cumsum(2)[:, :, :-1], (0, 0, 0, 0, 1, 0))  # [b, h, m, dh, dh]
        own = fk.transpose(-1, -2) @ (v * (self.beta ** (c - 1 - r))[:, None])  # each chunk's momentum at its end
        p = shifted(decayed_cumsum(own, self.beta ** c, max(m - 1, 0).bit_length()), 1)  # before each chunk
        num = (fq @ s).sub_((fq @ p).mul_((self.beta ** (r + 2))[:, None])).add_(a @ v)
        return num.div_(den).view(b, h, m * c, dh)[:, :, :n]

    def _prefix_sums(self, fq, fk, v):
        """The numerator / g for a symbolic n (export): per position, S_i - beta P_i with S_i the cumulative and
        P_i the decayed (beta^(i-j)) sum of phi(k_j) v_j^T; O(n dh^2) memory, never n x n."""
        kv = fk.unsqueeze(-1) * v.unsqueeze(-2)  # [b, h, n, dh, dh]
        # the doubling steps whose decay beta^(2^k) is not 0 in this dtype (the later ones add exact zeros)
        tiny = torch.finfo(fq.dtype).smallest_normal * torch.finfo(fq.dtype).eps
        steps = next((k for k in range(EXPORT_STEPS) if self.beta ** (1 << k) < tiny), EXPORT_STEPS)
        state = kv.cumsum(2) - decayed_cumsum(kv, self.beta, steps) * self.beta
        return (fq.unsqueeze(-2) @ state).squeeze(-2)

    def _step(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """Decoding: the t new tokens read S, P (the momentum after the last token seen) and z, and each other
        as one chunk; then the states take them in. [dh x dh], [dh x dh] and [dh] per K/V head."""
        q, k, v = self.qkv(x, ctx.offset)
        fq, fk = F.elu(q) + 1, F.elu(k) + 1
        b, kvh, t, dh = fk.shape
        key = slot(ctx, self)
        s, p, z = ctx.cache.caches.get(key, (fk.new_zeros(b, kvh, dh, dh), fk.new_zeros(b, kvh, dh, dh),
                                             fk.new_zeros(b, kvh, 1, dh)))
        r = torch.arange(t, device=x.device, dtype=fq.dtype)
        fkx, vx = self.expand_kv(fk), self.expand_kv(v)
        a = (fq @ fkx.transpose(-1, -2)).mul_(self._chunk_weights(t, x.device, fq.dtype))
        num = fq @ self.expand_kv(s) - (fq * (self.beta ** (r + 2))[:, None]) @ self.expand_kv(p) + a @ vx
        den = (fq * (self.expand_kv(z) + fkx.cumsum(2))).sum(-1, keepdim=True) + self.eps
        ctx.cache.caches[key] = (s + fk.transpose(-1, -2) @ v,
                                 p * self.beta ** t + (fk * (self.beta ** (t - 1 - r))[:, None]).transpose(-1, -2) @ v,
                                 z + fk.sum(2, keepdim=True))
        return self.out(num * self.g / den)


def momentum_cost(p: MomentumParams, env: OpEnv, s: Symbols) -> Cost:
    """Bidirectional: (w phi(K))^T V per K/V head, phi(Q) S and phi(Q) z per query head. Causal, over N = m C tokens
    (n padded to C-token chunks), per chunk: the C x C products phi(Q) phi(K)^T and A V, the chunk's plain and
    momentum states phi(K)^T V and phi(K)^T (w V), and phi(Q) S, phi(Q) P; the doubling steps are elementwise."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    grouped = kv != h
    if env.causal:
        c = sp.Min(MomentumAttention.chunk, n)
        N = sp.ceiling(n / c) * c
        m = N / c
        t, a, st = b * h * N * dh * by, b * h * N * c * by, b * h * m * dh ** 2 * by  # a chunked tensor, A, a state
        steps = sp.ceiling(sp.log(m, 2))  # doubling steps of the momentum over chunks
        fwd = 4 * b * h * N * c * dh + 8 * b * h * N * dh ** 2
        other = 11 * b * h * N * dh + 3 * b * h * N * c + b * h * m * dh ** 2 * (3 + 2 * steps) + 2 * b * h * N
        # kept: the chunked q and k (elu's inputs), phi(q), phi(k), the sums z_i, v chunked and weighted, A and the
        # weights, the states S and P, the two weight vectors, the denominator, the result; o_proj's copy
        saved = 8 * t + a + c ** 2 * by + 2 * st + 2 * c * by + b * h * N * by + q
        qkv_h = q + (2 * q if grouped else 2 * kvb)  # q, and k, v at the query heads
        padded = sp.Min(1, N - n)
        v_copy = t if not grouped else t * padded  # v chunked: repeated K/V heads are contiguous already
        # at phi(Q) P: phi(q), phi(k), v chunked, the denominator, A, the states S, own and P (padded by one
        # chunk), P's copy for the batched matmul; phi(Q) S and phi(Q) P
        phases = [qkv_h + 2 * t + v_copy + b * h * N * by + a + 4 * st + b * h * dh ** 2 * by + 2 * t,
                  qkv_h + t + q + out]  # at o_proj
        # backward: at the division, the gradient of the result (padded: a new one, o_proj's copy released)
        # beside the division's three temporaries and the numerator's gradient; then A's gradient
        bwd = [5 * t - q * padded, a + t - q * padded]
    else:
        fwd = 2 * b * kv * n * dh ** 2 + 2 * b * h * n * dh ** 2
        other = 2 * b * n * (h + kv) * dh + 3 * b * kv * n * dh + 2 * b * h * n
        # kept: q and k (elu's inputs), the weights, v and w phi(k), phi(q), z and S (at the query heads), the
        # denominator, the result, o_proj's copy; with several sequences, phi(q)'s copy for the batched matmul
        batch_copy = q * sp.Min(1, b - 1)
        saved = 4 * q + 3 * kvb + n * by + b * h * (dh + dh ** 2 + n) * by + batch_copy
        phases = [q + 2 * kvb + 2 * q + kvb + b * h * n * by + b * (h + kv) * dh ** 2 * by + batch_copy,  # phi(Q) S
                  q + 2 * kvb + 2 * q + out,  # at o_proj: the result and its copy
                  # at S: phi(q), phi(k), w phi(k) (and, with several sequences, its and v's batched copies)
                  q + 2 * kvb + q + 2 * kvb + 2 * kvb * sp.Min(1, b - 1) + b * kv * dh ** 2 * by]
        bwd = [4 * q]
    core = Cost(fwd=fwd, bwd=2 * fwd, fwd_other=other, bwd_other=2 * other)
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=b * kv * (2 * dh ** 2 + dh) * by,
                          bwd_phases=bwd)


OP = register(Op(
    decode="the plain sums S [dh x dh] and z [dh] and the momentum P [dh x dh] per K/V head: constant in the "
           "tokens seen",
    family="mha", variant="momentum", params=MomentumParams, module=MomentumAttention,
    causal="yes", shape=weightless_shape("mha(momentum)"),
    paper="Momentum Transformer: Closing the Performance Gap Between Self-attention and Its Linearization, "
          "Nguyen et al. 2022, arXiv:2208.00579",
    summary="linear attention (phi = elu + 1) with heavy-ball momentum on its state: key j weighs "
            "gamma (1 - beta^(i-j+1)) / (1 - beta) at query i; causal: j <= i",
    note="MHA/RightProduct/010.md",
    cost=momentum_cost,
))
