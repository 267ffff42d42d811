"""mha(skyformer, landmarks=m): Skyformer (Chen, Zeng, Ji & Yang 2021), kernelized attention by a modified Nyström
method.

Kernelized attention (eq. 3) replaces softmax by a Gaussian kernel, unnormalised: per head

    out = C V,   C = kappa(Q / dh^(1/4), K / dh^(1/4)),   C_ij = exp(-||q_i - k_j||^2 / (2 sqrt(dh)))   (_gaussian.py)

C is not PSD, but it is the top-right block of the PSD kernel matrix of the stacked rows, B = kappa([Q; K], [Q; K])
(eq. 4). Nyström on B with a 0/1 sub-sampling matrix S of 2m of its rows, the landmarks L = S^T [Q; K] (eq. 5-6):

    C~ = kappa(Q, L) M^+ kappa(L, K),    M = kappa(L, L) in R^{2m x 2m},    out = kappa(Q, L) (M^+ (kappa(L, K) V))

The pseudo-inverse as the paper's section 4.4 and the authors' code: with M' = M + gamma I and D = diag(M' 1),
M^+ ~ D^{-1/2} Z D^{-1/2}, Z Nyströmformer's iteration (nystrom.iterative_pinv, per head) on D^{-1/2} M' D^{-1/2},
whose singular values lie in (0, 1) (their Lemma 3). gamma = ridge (0.1 in the code); ridge=0 and many iterations
give the exact M^+.

Landmarks: m rows of Q and m of K (the authors' code takes half its d features from each), the first token of
each of m segments of the positions (_gaussian.py); the paper and code draw them uniformly at random each call, ours
are fixed so that a model is a function (and exports). With every row a landmark (m = n) C~ = C exactly (up to the
inverse): a sequence of n <= m tokens runs exact kernelized attention, O(n^2 dh) <= O(n m dh). Padding: landmarks
among each sequence's own tokens, padded values zeroed; a sequence of at most m tokens reads its keys exactly (its
landmarks are its tokens: W = M^+ kappa(L, K) V is replaced by (0; V)), so a padded batch equals each sequence
alone. K/V heads (GQA): the key landmarks of a K/V head serve its query heads. No causal form (the landmarks mix
every position; the paper is bidirectional), no dropout, no position scheme. O(n m dh) time and memory.
"""
from __future__ import annotations

import sympy as sp
import torch
from pydantic import Field

from ..cost import Cost, Symbols, piecewise
from ..registry import Op, OpEnv, ShapeProblem, register
from ._common import AttentionBase, AttentionParams, attention_cost, attention_shape, head_symbols
from ._gaussian import first_positions, gaussian_kernel, segment_ranks
from .nystrom import iterative_pinv


class SkyformerParams(AttentionParams):
    landmarks: int = Field(64, ge=1, le=4096, description="m: landmark rows of Q and of K each (2m in all)")
    pinv_iters: int = Field(6, ge=1, le=100, description="iterations of the Moore-Penrose approximation")
    ridge: float = Field(0.1, ge=0.0, le=10.0, description="gamma: M + gamma I is inverted (the authors' 0.1)")


def skyformer_shape(p: SkyformerParams, env: OpEnv):
    if p.dropout:
        raise ShapeProblem("mha(skyformer) has no dropout on its kernels (the authors' code applies none)",
                           "dropout", "remove dropout=, or put dropout(standard) on the stream")
    return attention_shape(p, env)


class SkyformerAttention(AttentionBase):
    def __init__(self, p: SkyformerParams, env: OpEnv):
        super().__init__(p, env)
        self.m, self.iters, self.ridge = p.landmarks, p.pinv_iters, p.ridge

    def forward(self, x, ctx):
        q, k, v = self.qkv(x)
        b, n = x.shape[0], x.shape[1]
        mask = ctx.mask if ctx is not None else None
        eager = isinstance(n, int) and not torch.compiler.is_exporting()
        kv, g = self.kv_heads, self.heads // self.kv_heads
        # contiguous [b, H, n, dh]: the kernel's matmul and squared norms share one copy (bmm needs one)
        q, k = q.contiguous(), k.contiguous()
        if eager and mask is None and n <= self.m:  # exact kernelized attention, the g heads of a group as rows
            return self.out((gaussian_kernel(q.view(b, kv, g * n, -1), k) @ v).view_as(q))
        if eager and mask is None:  # every sequence has n > m tokens: the same positions for all
            j = torch.arange(self.m, device=x.device)
            idx, short = ((j * n + self.m - 1) // self.m)[None], None
        else:
            keep, length, _, first, valid = segment_ranks(mask, n, self.m, x.device)
            idx = first_positions(keep, first).expand(b, -1)
            short = (length <= self.m)[:, :, None, None]  # [b, 1, 1, 1]
            v = v * keep[:, None, :, None].to(v.dtype)

        def rows(t):  # [b, H, n, dh] -> [b, H, m, dh], the landmark positions
            return t.gather(2, idx[:, None, :, None].expand(t.shape[0], t.shape[1], -1, t.shape[3]))

        land = torch.cat((rows(q), self.expand_kv(rows(k))), 2)  # L [b, h, 2m, dh]
        # kappa(L, K) V: the g heads of a group as rows against their K/V head, [b, kv, g 2m, dh]
        w = self._inverse_times(land, (gaussian_kernel(land.view(b, kv, g * 2 * self.m, -1), k) @ v).view_as(land))
        if short is not None:  # one landmark per token: kappa(Q, K) V exactly, with W = (0; V of the tokens)
            exact = self.expand_kv(rows(v) * valid[:, None, :, None].to(v.dtype))
            w = torch.where(short, torch.cat((torch.zeros_like(exact), exact), 2), w)
        return self.out(gaussian_kernel(q, land) @ w)

    def _inverse_times(self, land, klv):
        """M^+ klv ~ D^{-1/2} Z D^{-1/2} klv, klv [b, h, 2m, dh]."""
        mm = gaussian_kernel(land, land)
        if self.ridge:
            mm = mm + self.ridge * torch.eye(mm.shape[-1], dtype=mm.dtype, device=mm.device)
        r = mm.sum(-1).rsqrt_()[..., None]  # D^{-1/2}, [b, h, 2m, 1]
        z = iterative_pinv(mm * r * r.transpose(-1, -2), self.iters)
        return (z @ (klv * r)) * r


def skyformer_cost(p: SkyformerParams, env: OpEnv, s: Symbols) -> Cost:
    """Two regimes, by n: n <= m, the [b, h, n, n] kernel and its product with V; otherwise the landmark form:
    the gathers of 2m landmark rows, kappa(L, K) [2m, n] and its product with V, M [2m, 2m], the iteration (4
    [2m, 2m] products each), Z (D^{-1/2} kappa(L, K) V), kappa(Q, L) [n, 2m] and its product with W. Kept for
    backward: contiguous copies of q and k (the kernels' matmuls and squared norms read them) and of v (its
    bmm's), o_proj's input; the landmarks, kappa(L, K) V, its two scalings and W; both [n, 2m] kernels; M, M +
    gamma I, its two scalings (the last the iteration's A), Z_0 and per step A Z, the three factors and Z."""
    h, kv, dh = head_symbols(p, s)
    b, n, m, by, it = s.b, s.n, s.sym("m_l", p.landmarks), s.bytes, p.pinv_iters
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    proj = q + 2 * kvb  # q and k as contiguous copies, v
    vcopy = kvb * sp.Min(1, b - 1)  # bmm's copy of v (one sequence: a view)
    # exact (n <= m): the kernel [b, h, n, n] kept; backward: its gradient and the exp's beside v's, o_proj's
    # input and v released
    sc = b * h * n * n
    exact = attention_cost(
        p, s, h, kv, dh, Cost(fwd=4 * sc * dh, bwd=8 * sc * dh, fwd_other=5 * sc + 2 * b * (h + kv) * n * dh,
                              bwd_other=10 * sc + 4 * b * (h + kv) * n * dh), Cost(),
        2 * q + 2 * kvb + sc * by,
        [proj + sc * by + q, proj + sc * by + vcopy + q, proj + 2 * q + out], cache=0,
        bwd_phases=[2 * sc * by - q])
    # the landmark form
    L, S2, sl = b * h * 2 * m * dh * by, b * h * 4 * m ** 2 * by, b * h * 2 * m * n * by
    ridge = 1 if p.ridge else 0
    core = Cost(fwd=8 * b * h * m * n * dh * 2 + 16 * b * h * m ** 2 * dh + 64 * b * h * m ** 3 * it,
                bwd=32 * b * h * m * n * dh + 32 * b * h * m ** 2 * dh + 128 * b * h * m ** 3 * it,
                fwd_other=10 * sl / by + b * h * 4 * m ** 2 * (6 + 4 * it) + 2 * b * (h + kv) * n * dh,
                bwd_other=2 * (10 * sl / by + b * h * 4 * m ** 2 * (6 + 4 * it) + 2 * b * (h + kv) * n * dh))
    small = 2 * b * h * 2 * m * by + b * h * by + 8 * m
    kept = 2 * q + 2 * kvb + 5 * L + 2 * sl + (4 + ridge + 5 * it) * S2 + small
    phases = [proj + 2 * L + sl + vcopy,  # kappa(L, K) V: the landmarks, the kernel, the copy of v, the product
              proj + 2 * L + 6 * S2 + 16 * m ** 2 * by,  # the iteration: M (+ gamma I), A, Z, three temporaries
              proj + 2 * L + sl + q,  # kappa(Q, L) W: the landmarks, W, the kernel, q's square
              proj + 2 * L + 2 * q + out]  # o_proj
    # backward: kappa(Q, L)'s gradient and the exp's (o_proj's input, W released); then the gradient of q's
    # squared norm (three [b, h, n, dh] temporaries) beside those of W and the landmarks' norms
    bwd = [2 * sl - q, 2 * q + L + b * h * n * by]
    nys = attention_cost(p, s, h, kv, dh, core, Cost(), kept, phases, cache=0, bwd_phases=bwd)
    return piecewise([(exact, n <= m), (nys, True)])


OP = register(Op(
    decode=None,  # bidirectional only: the landmarks are drawn from every position
    family="mha", variant="skyformer", params=SkyformerParams, module=SkyformerAttention,
    causal="no", shape=skyformer_shape, cost=skyformer_cost,
    paper="Skyformer: Remodel Self-Attention with Gaussian Kernel and Nystr\u00f6m Method, Chen et al. 2021, "
          "arXiv:2111.00035",
    summary="exp(-||q - k||^2 / (2 sqrt(dh))) V, unnormalised, by Nystr\u00f6m on the PSD kernel of [Q; K] with m "
            "landmark rows of each: kappa(Q, L) M^+ kappa(L, K) V; O(n m d)",
    note="MHA/MatrixMethod/001.md",
))
