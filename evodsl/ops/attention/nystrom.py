"""mha(nystrom, landmarks=m, conv=k): Nyströmformer (Xiong et al. 2021), softmax attention by the Nyström method.

Per head, with landmarks Q~, K~ in R^{m x dh} the means of m segments of the positions of Q and K,

    kernel_1 = softmax(Q K~^T / sqrt(dh)),  kernel_2 = softmax(Q~ K~^T / sqrt(dh)),  kernel_3 = softmax(Q~ K^T / sqrt(dh))
    out = kernel_1 Z (kernel_3 V) (+ conv(V)),   Z ~ kernel_2^+ by the paper's iteration (eq. 16):
    Z_0 = kernel_2^T / c,   Z_{j+1} = 1/4 Z_j (13 I - K Z_j (15 I - K Z_j (7 I - K Z_j))),   K = kernel_2

with c the largest column sum of kernel_2 (its 1-norm; its inf-norm is 1), per head (pinv_init=head, the paper's
equation), or the largest over the heads of the sequence (pinv_init=sequence: the authors' and HF's code, which
takes it over the whole batch; one sequence alone reads the same). conv=k adds a depthwise convolution of V along
the positions (one k-tap kernel per K/V head, zero padded; HF's conv_kernel_size). Both products run as SDPA:
kernel_3 V is attention of the m landmark queries over the n keys, kernel_1 (Z kernel_3 V) attention of the n
queries over the m landmark keys: O(n m dh), never n x n, no [n, m] weights kept.

Segments: m segments of the n positions; when m does not divide n, segment j holds the positions r with
floor(r m / n) = j (sizes differ by one at most; the paper requires m | n). A sequence of n <= m positions is
exact softmax attention (as HF at n = m: each segment would be one token). Padding: each sequence gets the
segments of its own tokens, and one with no more than m tokens its exact attention, so a padded batch equals
each sequence alone; padded values are zeroed before the convolution. No causal form (landmarks mix every
position), no dropout (HF and the authors' code apply none).
"""
from __future__ import annotations

from typing import Literal

import sympy as sp
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..cost import Cost, Symbols, piecewise
from ..registry import Op, OpEnv, ShapeProblem, register
from ._common import LSE_BYTES, AttentionBase, AttentionParams, attention_cost, attention_shape, head_symbols


class NystromParams(AttentionParams):
    landmarks: int = Field(64, ge=1, le=4096, description="m: segment-mean landmarks of Q and K")
    conv: int = Field(0, ge=0, le=4095, description="k: taps of the depthwise convolution of V added to the output; "
                                                    "0 = none (odd: centred)")
    pinv_iters: int = Field(6, ge=1, le=64, description="iterations of the Moore-Penrose approximation of kernel_2^+")
    pinv_init: Literal["head", "sequence"] = Field("head", description="Z_0 = kernel_2^T / c, c the largest column "
                                                   "sum per head (the paper) or over the sequence's heads (HF)")


def nystrom_shape(p: NystromParams, env: OpEnv):
    if p.dropout:
        raise ShapeProblem("mha(nystrom) has no dropout on its kernels (HF's and the authors' code apply none)",
                           "dropout", "remove dropout=, or put dropout(standard) on the stream")
    if p.conv % 2 == 0 and p.conv:
        raise ShapeProblem(f"conv={p.conv} is even: a centred convolution needs an odd kernel", "conv",
                           f"use conv={p.conv + 1} (HF: 65), or 0 for none")
    return attention_shape(p, env)


def iterative_pinv(a: torch.Tensor, iters: int, per_head: bool = True) -> torch.Tensor:
    """The paper's approximation of a^+ for row-stochastic a [b, h, m, m] (Z_0 = a^T / ||a||_1)."""
    col = a.sum(-2).amax(-1, keepdim=True)  # [b, h, 1]: ||a||_1
    if not per_head:
        col = col.amax(-2, keepdim=True)
    z = a.transpose(-1, -2) / col[..., None]
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    eye7, eye15, eye13 = 7 * eye, 15 * eye, 13 * eye
    for _ in range(iters):
        az = a @ z
        z = (z @ (eye13 - az @ (eye15 - az @ (eye7 - az)))).mul_(0.25)
    return z


class NystromAttention(AttentionBase):
    def __init__(self, p: NystromParams, env: OpEnv):
        super().__init__(p, env)
        self.m, self.iters, self.per_head = p.landmarks, p.pinv_iters, p.pinv_init == "head"
        k = p.conv
        self.conv = nn.Parameter(torch.empty(self.kv_heads, 1, k, 1).uniform_(-k ** -0.5, k ** -0.5)) if k else None

    def forward(self, x, ctx):
        q, k, v = self.qkv(x)
        n = x.shape[1]
        mask = ctx.mask if ctx is not None else None
        eager = isinstance(n, int) and not torch.compiler.is_exporting()
        gqa = self.kv_heads != self.heads
        if eager and n <= self.m:  # exact softmax attention: every segment would be one token
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.allowed(ctx, n, x.device), enable_gqa=gqa)
        elif eager and mask is None and n % self.m == 0:  # m equal segments: means of views
            o = self._nystrom(q, k, v, self._equal_means(q), self._equal_means(k))
        else:
            o = self._segmented(q, k, v, mask, n)
        if self.conv is not None:
            kept = v if mask is None else v * mask[:, None, :, None].to(v.dtype)
            c = F.conv2d(kept, self.conv, padding=(self.conv.shape[2] // 2, 0), groups=self.kv_heads)
            o = o + self.expand_kv(c)
        return self.out(o)

    def _equal_means(self, t):
        """[b, H, n, dh] -> [b, H, m, dh]: the means of m segments of n / m positions (a view, then a mean)."""
        b, heads, n, dh = t.shape
        return t.reshape(b, heads, self.m, n // self.m, dh).mean(-2)

    def _nystrom(self, q, k, v, ql, kl, key_mask=None, valid=None, short=None, means=None):
        """kernel_1 Z (kernel_3 V) per head, as two SDPA calls. key_mask [b, 1, 1, n] (padding), valid [b, 1, 1, m]
        (the landmarks a sequence has); rows `short` ([b, 1, 1, 1]) are exact: Z = I and kernel_3 V = `means`."""
        kl = self.expand_kv(kl)
        scores = (ql @ kl.transpose(-1, -2)).mul_(self.head_dim ** -0.5)
        if valid is not None:
            scores.masked_fill_(~valid, float("-inf"))
        scores = scores.softmax(-1)  # kernel_2, in place of its scores
        z = iterative_pinv(scores, self.iters, self.per_head)
        kv = F.scaled_dot_product_attention(ql, k, v, attn_mask=key_mask, enable_gqa=self.kv_heads != self.heads)
        w = z @ kv
        if short is not None:
            w = torch.where(short, means, w)
        return F.scaled_dot_product_attention(q, kl, w, attn_mask=valid)

    def _segmented(self, q, k, v, mask, n):
        """Segments of each sequence's own tokens (uneven where m does not divide its length), their means by a
        [b, m, n] averaging matrix; a sequence of at most m tokens reads them exactly (one per segment)."""
        dev = q.device
        keep = torch.ones(1, n, dtype=torch.bool, device=dev) if mask is None else mask
        rank = keep.long().cumsum(-1) - 1  # a token's place among its sequence's tokens
        length = keep.sum(-1, keepdim=True)  # [b or 1, 1]
        used = length.clamp(min=1, max=self.m)  # the segments a sequence has
        seg = torch.where(keep, rank * used // length.clamp(min=1), -1)  # [b, n], -1 for padding
        j = torch.arange(self.m, device=dev)
        member = seg[:, None, :] == j[None, :, None]  # [b, m, n]
        avg = member.to(q.dtype).div_(member.sum(-1, keepdim=True).clamp(min=1))

        def means(t):  # [b, H, n, dh] (a view of its projection's [b, n, H dh]) -> [b, H, m, dh], contiguous
            return (avg @ t.transpose(1, 2).flatten(2)).unflatten(-1, (t.shape[1], -1)).transpose(1, 2).contiguous()

        valid = (j[None, :] < used)[:, None, None, :]  # [b, 1, 1, m]
        short = (length <= self.m)[:, :, None, None]
        key_mask = None if mask is None else mask[:, None, None, :]
        return self._nystrom(q, k, v, means(q), means(k), key_mask, valid, short, self.expand_kv(means(v)))


def nystrom_cost(p: NystromParams, env: OpEnv, s: Symbols) -> Cost:
    """Three regimes, by n: n <= m, SDPA over [b, h, n, n] scores; m | n, the means of views; otherwise the
    [b, m, n] averaging matrix (its products with q, k and v). The Nyström core: kernel_2 ([m, m] per head), the
    iteration (4 [m, m] products each), SDPA of the m landmark queries over n keys, Z (kernel_3 V), SDPA of the n
    queries over the m landmark keys. Autograd keeps of the iteration kernel_2, Z_0, and per step A Z, the three
    polynomial factors and Z. The convolution: FlopCounterMode counts its weight's gradient kv times (as if it
    were not grouped); it keeps its output's sum with o for o_proj."""
    h, kv, dh = head_symbols(p, s)
    b, n, by, m, it = s.b, s.n, s.bytes, s.sym("m_l", p.landmarks), p.pinv_iters
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    qkv, lse = q + 2 * kvb, LSE_BYTES * b * h * n
    gqa = 0 if kv == h else 1
    conv = Cost()
    copy = c = 0
    if p.conv:
        taps = s.sym("k_c", p.conv)
        f = 2 * b * kv * n * dh * taps
        conv = Cost(params=kv * taps, fwd=f, bwd=(1 + kv) * f, fwd_other=b * h * n * dh, bwd_other=b * h * n * dh)
        copy, c = q, kvb  # o + conv(V), o_proj's input; conv(V)
    # at o_proj: q, k, v, o (or o + conv(V)), conv(V); with conv, at the sum: o, conv(V) (at h heads), the sum
    final = [qkv + q + c + out] + ([qkv + 2 * q + c + q * gqa] if p.conv else [])
    # backward, at the kernel: o's gradient, or with conv, V's through it (o_proj's input released)
    g_o = kvb if p.conv else q
    # exact attention (n <= m)
    scores = b * h * n ** 2
    exact = attention_cost(p, s, h, kv, dh, Cost(fwd=4 * scores * dh, bwd=10 * scores * dh, fwd_other=5 * scores,
                                                 bwd_other=10 * scores) + conv, Cost(),
                           qkv + q + lse + copy, final, cache=0,
                           bwd_phases=[g_o + q + 2 * kvb])
    # the Nyström core
    L, S2, sq = b * h * m * dh * by, b * h * m ** 2 * by, b * h * m * n
    pinv = 8 * b * h * m ** 3 * it
    core = Cost(fwd=4 * b * h * m ** 2 * dh + pinv + 8 * sq * dh, bwd=8 * b * h * m ** 2 * dh + 2 * pinv + 20 * sq * dh,
                fwd_other=b * h * m ** 2 * (6 + 4 * it) + 10 * sq + 2 * b * (h + kv) * n * dh,
                bwd_other=2 * (b * h * m ** 2 * (6 + 4 * it) + 10 * sq + 2 * b * (h + kv) * n * dh))
    kept = qkv + 4 * L + (2 + 5 * it) * S2 + b * h * m * by + q + lse + LSE_BYTES * b * h * m + copy
    inside = qkv + 2 * L + 5 * S2 + 4 * m ** 2 * by  # the iteration: the landmarks, A, Z, A Z, two factors, 7I..
    last = qkv + 4 * L + 2 * S2 + q + lse  # the second SDPA: the landmarks, A, Z, kernel_3 V, W, its output
    phases = [inside, last, *final]
    bwd = [g_o + q + 2 * L]  # the second SDPA's gradients (q, the landmark keys, W) beside o's
    equal = attention_cost(p, s, h, kv, dh, core + conv, Cost(), kept, phases, cache=0, bwd_phases=bwd)
    # uneven segments: the averaging matrix (kept for its products), the means of q, k, v by it; the bool
    # membership beside it while the core runs
    avg, means = m * n * by, 2 * b * m * n * (h + 2 * kv) * dh
    uneven = attention_cost(p, s, h, kv, dh, core + conv + Cost(fwd=means, bwd=means,
                                                               fwd_other=3 * m * n), Cost(),
                            kept + avg, [inside + avg + m * n + L, last + avg + m * n + L, *final], cache=0,
                            bwd_phases=bwd)
    return piecewise([(exact, n <= m), (equal, sp.Eq(sp.Mod(n, m), 0)), (uneven, True)])


OP = register(Op(
    decode=None,  # bidirectional only: the landmarks are means over every position
    family="mha", variant="nystrom", params=NystromParams, module=NystromAttention,
    causal="no", shape=nystrom_shape, cost=nystrom_cost,
    paper="Nyströmformer: A Nyström-Based Algorithm for Approximating Self-Attention, Xiong et al. 2021, "
          "arXiv:2102.03902",
    summary="softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V (+ conv(V)), Q~, K~ means of m segments, "
            "pinv by 6 Newton-type iterations; O(n m d)",
    note="",  # no note in the reference; CATALOG.md lists it
))
