"""mha(soft, landmarks=m): SOFT, the softmax-free transformer (Lu, Yao, Zhang, Zhu, Xu, Gao, Xu, Xiang & Zhang
2021), Gaussian-kernel attention with Q = K by the Nyström method.

Per head, keys are the queries (one projection W_q; no W_k) and the scores a Gaussian kernel, unnormalised:

    S_ij = exp(-||q_i - q_j||^2 / (2 sqrt(dh)))   (eq. 4; the authors' code scales Q by dh^(-1/4), then exp(-d^2 / 2))

S is symmetric PSD, so with bottleneck tokens Q~ in R^{m x dh} (eq. 6-8)

    S^ = exp(Q - Q~) exp(Q~ - Q~)^+ exp(Q~ - Q),   out = K1 (A^+ (K1^T V)),   K1 = kappa(Q, Q~) [n, m], A = kappa(Q~, Q~)

A^+ by the Newton-Raphson iteration of the paper (Algorithm 1) as the authors' code runs it: P = A + ridge I
(0.01 there), V_0 = alpha P with alpha = 0.9 * 2 / ||A||_1^2 (per head: A is symmetric, its 1-norm its largest
row sum), V_{k+1} = 2 V_k - V_k P V_k, pinv_iters (20) times. Like the code, the iteration runs without autograd
and its backward is that of the inverse: dL/dP = -V^T G V^T (two matmuls, only V kept).

Q~: the means of Q over m segments of the positions (_gaussian.py), the average-pooling form of the paper's
downsampling of Q; the authors' vision code uses a learned stride-r convolution over the 2-D token grid followed by
LayerNorm and GELU, which needs a fixed grid (not built). With one token per segment (m = n) Q~ = Q and S^ = A A^+
A = S exactly (up to the iteration): a sequence of n <= m tokens runs exact S V, O(n^2 dh) <= O(n m dh). Padding:
segments of each sequence's own tokens, padded values zeroed (padded keys add nothing); a sequence of at most m
tokens is exact (its landmarks are its tokens: W = A^+ K1^T V is replaced by their V), so a padded batch equals
each sequence alone. kv_heads < heads shares V heads only (K is Q). No causal form (the landmarks are means over
every position; the paper is for vision encoders), no dropout, no position scheme. O(n m dh) time and memory.
"""
from __future__ import annotations

import sympy as sp
import torch
from pydantic import Field

from ..cost import Cost, Symbols, linear, piecewise
from ..registry import Op, OpEnv, ShapeProblem, register
from ._common import AttentionBase, AttentionParams, attention_cost, attention_shape, head_symbols
from ._gaussian import first_positions, gaussian_kernel, segment_ranks


class SoftParams(AttentionParams):
    landmarks: int = Field(64, ge=1, le=4096, description="m: bottleneck tokens, the means of m segments of Q")
    pinv_iters: int = Field(20, ge=1, le=200, description="Newton-Raphson iterations for A^+ (the code's 20)")
    ridge: float = Field(0.01, ge=0.0, le=10.0, description="A + ridge I is inverted (the authors' code: 0.01)")


def soft_shape(p: SoftParams, env: OpEnv):
    if p.dropout:
        raise ShapeProblem("mha(soft) has no dropout on its kernels (the authors' code applies none)",
                           "dropout", "remove dropout=, or put dropout(standard) on the stream")
    return attention_shape(p, env)


def newton_pinv(a: torch.Tensor, iters: int, ridge: float) -> torch.Tensor:
    """(A + ridge I)^+ for symmetric A [.., m, m]: V_0 = 0.9 * 2 / ||A||_1^2 (A + ridge I), V <- 2V - V P V."""
    p = a + ridge * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device) if ridge else a
    z = p * (1.8 / a.sum(-1).amax(-1).square())[..., None, None]
    for _ in range(iters):
        z = 2 * z - z @ p @ z
    return z


class NewtonPinv(torch.autograd.Function):
    """newton_pinv run without autograd; the backward of the inverse, -V^T G V^T (V taken for P^{-1})."""

    @staticmethod
    def forward(ctx, a, iters, ridge):
        z = newton_pinv(a, iters, ridge)
        ctx.save_for_backward(z)
        return z

    @staticmethod
    def backward(ctx, grad):
        zt = ctx.saved_tensors[0].transpose(-1, -2)
        return -(zt @ grad @ zt), None, None


class SoftAttention(AttentionBase):
    def __init__(self, p: SoftParams, env: OpEnv):
        super().__init__(p, env)
        del self.k_proj  # K = Q
        self.m, self.iters, self.ridge = p.landmarks, p.pinv_iters, p.ridge

    def forward(self, x, ctx):
        b, n = x.shape[0], x.shape[1]
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        mask = ctx.mask if ctx is not None else None
        eager = isinstance(n, int) and not torch.compiler.is_exporting()
        if eager and mask is None and n <= self.m:  # exact S V
            q = q.transpose(1, 2).contiguous()  # the kernel's matmul and squared norms share one copy
            return self.out(gaussian_kernel(q, q) @ self.expand_kv(v))
        keep, length, used, first, valid = segment_ranks(mask, n, self.m, x.device)
        ql = self._bottleneck(q.flatten(2), keep, length, used)
        q = q.transpose(1, 2).contiguous()
        k1 = gaussian_kernel(q, ql)  # [b, h, n, m]
        if mask is not None:
            v = v * keep[:, None, :, None].to(v.dtype)
        v = self.expand_kv(v)
        a = gaussian_kernel(ql, ql)
        inv = newton_pinv(a, self.iters, self.ridge) if not torch.is_grad_enabled() or torch.compiler.is_exporting() \
            else NewtonPinv.apply(a, self.iters, self.ridge)
        w = inv @ (k1.transpose(-1, -2) @ v)
        del a, inv
        if mask is not None or not eager:  # a sequence of at most m tokens: W = the V of its tokens, in order
            idx = first_positions(keep, first).expand(b, -1)
            exact = v.gather(2, idx[:, None, :, None].expand(-1, v.shape[1], -1, v.shape[3]))
            w = torch.where((length <= self.m)[:, :, None, None], exact * valid[:, None, :, None].to(v.dtype), w)
        o = k1 @ w
        del k1, w
        return self.out(o)

    def _bottleneck(self, qp, keep, length, used):
        """Q~ [b, h, m, dh]: the means of each sequence's m segments of q's projection qp [b, n, h dh], by an
        averaging matrix [b or 1, m, n]."""
        rank = keep.long().cumsum(-1) - 1
        seg = torch.where(keep, rank * used // length.clamp(min=1), -1)  # [b or 1, n], -1 for padding
        member = seg[:, None, :] == torch.arange(self.m, device=qp.device)[None, :, None]
        avg = member.to(qp.dtype).div_(member.sum(-1, keepdim=True).clamp(min=1))
        return (avg @ qp).unflatten(-1, (self.heads, -1)).transpose(1, 2).contiguous()


def soft_cost(p: SoftParams, env: OpEnv, s: Symbols) -> Cost:
    """Two regimes, by n: n <= m, S [b, h, n, n] and its product with V; otherwise the landmark form: the
    averaging matrix (one per sequence, kept for its product with q's projection), Q~, K1 [n, m], A [m, m], the
    iteration (2 [m, m] products each, without autograd; its backward 2), K1^T V, A^+ (K1^T V), K1 W. Kept: the
    contiguous copy of q (the kernels read it), V as bmm reads it (h heads), o_proj's input; the averaging matrix
    (one [m, n] for an unpadded batch, broadcast), K1, A, V_k (the inverse), Q~, K1^T V and W. No key projection:
    attention_cost's is taken off, and the input's gradient comes from two projections."""
    h, kv, dh = head_symbols(p, s)
    b, n, m, by, it = s.b, s.n, s.sym("m_l", p.landmarks), s.bytes, p.pinv_iters
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    nokey = linear(s, s.d, kv * dh, p.bias).scaled(-1)  # attention_cost counts a key projection: there is none
    vh = q if kv != h else kvb * sp.Min(1, b - 1)  # V for bmm: expanded to h heads, or bmm's copy (b > 1)
    # exact (n <= m)
    sc = b * h * n * n
    kept_exact = 3 * q + sc * by  # q's copy, S, V for bmm (h heads), o_proj's input
    exact = attention_cost(
        p, s, h, kv, dh, nokey + Cost(fwd=4 * sc * dh, bwd=8 * sc * dh, fwd_other=5 * sc + 2 * b * h * n * dh,
                                      bwd_other=10 * sc + 4 * b * h * n * dh), Cost(),
        kept_exact,
        [q + kvb + sc * by + q, q + kvb + sc * by + vh + q, q + kvb + 2 * q + out], cache=0,
        # S's gradient and the exp's beside V's (o_proj's input, V for bmm released)
        bwd_phases=[2 * sc * by - 2 * q + kvb], projections_bwd=3 * out - kept_exact)
    # the landmark form
    L, S, sl, avg = b * h * m * dh * by, b * h * m * m * by, b * h * n * m * by, m * n * by
    core = nokey + Cost(fwd=8 * b * h * n * m * dh + 4 * b * h * m ** 2 * dh + 4 * b * h * m ** 3 * it,
                        bwd=14 * b * h * n * m * dh + 8 * b * h * m ** 2 * dh + 4 * b * h * m ** 3,
                        fwd_other=5 * sl / by + b * h * m * m * (6 + 3 * it) + 2 * b * h * n * dh,
                        bwd_other=2 * (5 * sl / by + b * h * m * m * 6 + 2 * b * h * n * dh))
    kept = 3 * q + avg + 3 * L + sl + 2 * S
    ridge = 1 if p.ridge else 0
    vend = q if kv != h else kvb  # V as the kernel reads it: expanded to h heads, or v_proj's view
    vcopy = 0 if kv != h else kvb * sp.Min(1, b - 1)  # bmm's copy of the strided view (one sequence: none)
    core_live = q + vend + L + sl  # q's copy, V, Q~, K1
    phases = [q + kvb + avg + m * n + 16 * n + 2 * L,  # the averaging matrix (and its bool membership), Q~
              2 * q + kvb + L,  # q's contiguous copy beside its projection
              q + kvb + L + sl + q + (q if kv != h else 0),  # K1 beside q's square; V expanded
              core_live + (5 + ridge) * S + m * m * by,  # the iteration: A (, P), V, 2V, V P, V P V
              core_live + 2 * S + vcopy + L,  # K1^T V
              core_live + 2 * S + 2 * L,  # A^+ (K1^T V)
              core_live - sl + 2 * q + out]  # o_proj (K1 released)
    # backward: K1's two gradients (from K1 W and K1^T V) beside those of V (h heads), A^+ and K1^T V, o_proj's
    # input, W and K1^T V released; their sum (V released); the gradient of q's squared norm (three [b, h, n, dh]
    # temporaries)
    bwd = [2 * sl + S - L, 3 * sl + S - 2 * L - vend, 2 * q + kvb - vend - L - 2 * S + b * h * n * by]
    nys = attention_cost(p, s, h, kv, dh, core, Cost(), kept, phases, cache=0, bwd_phases=bwd,
                         projections_bwd=3 * out - kept)  # two input projections: their gradients and the sum
    return piecewise([(exact, n <= m), (nys, True)])


OP = register(Op(
    decode=None,  # bidirectional only: the bottleneck tokens are means over every position
    family="mha", variant="soft", params=SoftParams, module=SoftAttention,
    causal="no", shape=soft_shape, cost=soft_cost,
    paper="SOFT: Softmax-free Transformer with Linear Complexity, Lu et al. 2021, arXiv:2110.11945",
    summary="exp(-||q_i - q_j||^2 / (2 sqrt(dh))) V with K = Q, unnormalised, by Nystr\u00f6m: K1 A^+ K1^T V, "
            "K1 = kappa(Q, Q~), A = kappa(Q~, Q~), Q~ means of m segments, A^+ by Newton-Raphson; O(n m d)",
    note="MHA/Others/006.md",
))
