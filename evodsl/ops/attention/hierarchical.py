"""mha(hierarchical, block=Nr): H-Transformer-1D's hierarchical attention (Zhu & Soricut 2021, sections 5-6), with
the overlap correction of the authors' code (flaxformer h_transformer: OneDimHierarchicalAttention).

Level 0 is the sequence, cut into blocks of Nr tokens; level l + 1 coarsens level l by pairs: queries and keys are
averaged (Q~_j = (Q_2j + Q_2j+1) / 2), values summed (V~_j = V_2j + V_2j+1), so a level-l token is a cluster of
2^l tokens, and level l is cut into blocks of Nr clusters. Scores are exp(q~ . k~ / sqrt(dh)):

  level 0: each block against itself and its two neighbours, exact (the tri-diagonal A^(0));
  level l >= 1: each block against its two neighbours (the super- and sub-diagonal A~^(l)), less the quarter of
      each that level l - 1 already holds: query half i < Nr/2 (left neighbour) reads no key of the half j >= Nr/2,
      query half i >= Nr/2 (right neighbour) none of j < Nr/2 (the authors' correction mask).

Every pair (t, s) is thus read exactly once, at the lowest level l where their level-l blocks are at most one apart,
with the weight exp(q~_l(t) . k~_l(s)) of their clusters; levels run until one holds at most two blocks. The
results are interpolated back (each cluster's value to its 2^l tokens, the piecewise-constant P^(l)) and summed:
Y = Y^(0) + P^(0)(Y~^(1) + P^(1)(Y~^(2) + ..)), and the normaliser the same way with V replaced by ones (each key's
weight times its cluster's size), o = Y / rowsum. At n <= 2 Nr this is softmax attention; with queries and keys
constant over each coarse cluster it equals softmax attention at any n. O(n Nr d) time and memory (Nr (3 + 2 + 1 +
1/2 + ..) ~ 5 Nr scores a query).

Choices where the paper is silent: n need not be Nr 2^L: each level's clusters are pairs of the level below (the
last one possibly single, coarsened over its real tokens: means divide by the number of tokens, sums and the
normaliser count them), as if the sequence were zero-padded to Nr 2^L with the padding masked (the authors pad and
mask). Padded keys (ctx.mask) count as no token at every level, and padded queries enter no mean. Each level's rows
are normalised by their own maximum and the levels merged log-sum-exp style (the authors subtract one global offset,
which can underflow). Nr must be even (the correction halves a block).

Causal (the paper's causal form, the lower-triangular blocks): level 0 reads its own block up to the query and the
block before; level l >= 1 the block before, corrected the same way (query half i < Nr/2 reads no key j >= Nr/2).
A coarse query is the query of its cluster's first token (the authors' decoder samples it: an average would read
later tokens' queries), keys and values are coarsened as above, from blocks entirely before the query's. Decoding
keeps per level the coarse sums of the last three blocks and the query of the current cluster (O(Nr d log n)).
The export (a symbolic n) runs _hierarchical_export.gathered: the same weights per query, a fixed number of levels.
Right padding only (blocks are counted from each row's start: left padding moves the tokens, E409). No position
scheme inside (a coarse score has no single pair of positions: ALiBi, T5 and XL's biases do not apply; rope would
rotate q and k before they are averaged, not built here): positions come from the stream. No dropout.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from ..registry import Op, OpEnv, ShapeProblem, register, require_right_padding
from ._common import AttentionBase, AttentionParams
from ._hierarchical_cost import hierarchical_cost
from ._hierarchical_export import gathered
from ._hierarchical_step import hierarchical_step
from .isab import no_dropout_shape


class HierarchicalParams(AttentionParams):
    block: int = Field(16, ge=2, le=1 << 16, description="Nr: the block size, in tokens at level 0 and in clusters "
                                                         "above (even)")


def hierarchical_shape(p: HierarchicalParams, env: OpEnv):
    if p.block % 2:
        raise ShapeProblem(f"block={p.block} is odd: the hierarchy halves a block at every level", "block",
                           f"use an even block, e.g. block={p.block + 1}")
    return no_dropout_shape("mha(hierarchical)")(p, env)


def pattern(Nr: int, level: int, causal: bool, device) -> torch.Tensor:
    """bool [Nr, W]: which keys of a query block's window (the blocks before, at and after it, as the level reads
    them: W = 3 Nr, 2 Nr or Nr) query i of the block may read."""
    i = torch.arange(Nr, device=device)[:, None]
    j = torch.arange(Nr, device=device)[None, :]
    low, high = i < Nr // 2, j >= Nr // 2
    full = torch.ones(Nr, Nr, dtype=torch.bool, device=device)
    if level == 0:
        return torch.cat((full, j <= i) if causal else (full, full, full), dim=1)
    left = ~(low & high)  # the left neighbour, less what level - 1 holds
    return left if causal else torch.cat((left, ~(~low & ~high)), dim=1)


class HierarchicalAttention(AttentionBase):
    def __init__(self, p: HierarchicalParams, env: OpEnv):
        super().__init__(p, env)
        self.block = p.block

    def forward(self, x, ctx):
        if ctx is not None and ctx.cache is not None:
            return hierarchical_step(self, x, ctx)
        key_mask = self.key_mask(ctx)
        require_right_padding(key_mask, "mha(hierarchical)", "its blocks are counted from each row's first position, "
                                                             "and left padding moves the tokens")
        q, k, v = self.qkv(x)
        if not isinstance(x.shape[1], int):  # export: one graph for every n
            return self.out(gathered(self, q, k, v, key_mask))
        return self.out(self.attend(q, k, v, key_mask))

    def attend(self, q, k, v, key_mask=None):
        """q [b, h, n, dh], k, v [b, kv, n, dh], key_mask [b, n] or None -> o [b, h, n, dh]."""
        b, h, n, dh = q.shape
        qs, ks, vs = q * (1.0 / math.sqrt(dh)), k, v
        if key_mask is None:
            cnt = torch.ones(1, n, dtype=q.dtype, device=q.device)  # [B, n]: tokens per cluster
        else:  # padding: no token (zero sums, none counted)
            cnt = key_mask.to(q.dtype)
            w = cnt[:, None, :, None]
            ks, vs = k * w, v * w
            if not self.causal:
                qs = qs * w
        levels, level = [], 0
        while True:  # level l: (the queries' sums or samples, the keys' sums, the values' sums, the counts)
            levels.append((qs, ks, vs, cnt))
            m = cnt.shape[-1]
            if m <= 2 * self.block:
                break
            level += 1
            qs = qs[:, :, ::2] if self.causal else pairs(qs)
            ks, vs, cnt = pairs(ks), pairs(vs), pairs(cnt)
        acc = None  # (the sums, their normalisers, the rows' maxima) of the levels done, on this level's rows
        for level in range(len(levels) - 1, -1, -1):
            qs, ks, vs, cnt = levels.pop()  # each level's tensors released once read
            if level == 0:  # clusters of one token or none: the sums are the means
                new = self.level(qs, ks, vs, cnt, level)
            else:
                c = cnt.clamp(min=1)[:, None, :, None]
                new = self.level(qs if self.causal else qs / c, ks / c, vs / c, cnt, level)
            del qs, ks, vs
            if acc is not None:  # the coarser levels' sums to this level's rows, merged with its own
                m = cnt.shape[-1]
                acc = merge(tuple(t.repeat_interleave(2, dim=2)[:, :, :m] for t in acc), new)
            else:
                acc = new
            del new
        num, den, _ = acc
        return num / torch.where(den > 0, den, torch.ones_like(den))[..., None]

    def level(self, q, k, v, cnt, level: int):
        """One level: q [b, h, m, dh] (scaled), k, v the keys. and values. means [b, kv, m, dh], cnt [B, m] (the clusters. sizes, weights)
        -> (Y~ [b, h, m, dh], its row sums [b, h, m], the rows' maximum score [b, h, m])."""
        b, h, m, dh = q.shape
        Nr, kv = self.block, self.kv_heads
        g = h // kv
        nb = (m + Nr - 1) // Nr
        M = nb * Nr
        qb = F.pad(q, (0, 0, 0, M - m)).view(b, kv, g, nb, Nr, dh).transpose(2, 3).reshape(b, kv, nb, g * Nr, dh)
        logc = torch.where(cnt > 0, cnt.log(), torch.full_like(cnt, float("-inf")))
        logc = F.pad(logc, (0, M - m), value=float("-inf")).view(-1, 1, nb, 1, Nr)
        kb, vb = (F.pad(t, (0, 0, 0, M - m)).view(b, kv, nb, Nr, dh) for t in (k, v))

        def window(t, fill=0.0):  # [.., nb, Nr, X] -> [.., nb, W, X]: the blocks this level reads, in order
            left = F.pad(t, (0, 0, 0, 0, 1, 0), value=fill)[..., :nb, :, :]
            if self.causal:
                return torch.cat((left, t) if level == 0 else (left,), dim=-2)
            right = F.pad(t, (0, 0, 0, 0, 0, 1), value=fill)[..., 1:, :, :]
            return torch.cat((left, t, right) if level == 0 else (left, right), dim=-2)

        keys, vals = window(kb), window(vb)
        bias = window(logc.transpose(-1, -2), float("-inf")).transpose(-1, -2)  # [B, 1, nb, 1, W]
        allowed = pattern(Nr, level, self.causal, q.device).repeat(g, 1)  # [g Nr, W]
        del kb, vb
        s = (qb @ keys.transpose(-1, -2)).add_(bias).masked_fill_(~allowed, float("-inf"))
        del qb, keys
        # each row's maximum, a constant to the gradient (the levels' sums are merged under any one)
        mx = s.detach().amax(-1, keepdim=True).clamp_(min=torch.finfo(s.dtype).min)
        e = s.sub_(mx).exp_()
        num, den = e @ vals, e.sum(-1)  # [b, kv, nb, g Nr, dh], [b, kv, nb, g Nr]
        del s, e, vals

        def rows(t):  # [b, kv, nb, g Nr, ...] -> [b, h, m, ...]
            t = t.view(b, kv, nb, g, Nr, *t.shape[4:]).transpose(2, 3).reshape(b, h, M, *t.shape[4:])
            return t[:, :, :m]

        return rows(num), rows(den), rows(mx[..., 0])


def pairs(t: torch.Tensor) -> torch.Tensor:
    """Sums of consecutive pairs along dim 2 ([b, h, m, dh]) or the last dim ([B, m]); an odd last one alone."""
    dim = 2 if t.dim() == 4 else -1
    m = t.shape[dim]
    if m % 2:
        t = F.pad(t, (0, 0, 0, 1) if dim == 2 else (0, 1))
    return t.unflatten(dim, (-1, 2)).sum(dim + 1 if dim == 2 else -1)


def merge(a, b):
    """Two levels' (num, den, max) on the same rows, summed under their common maximum."""
    mx = torch.maximum(a[2], b[2])
    wa, wb = (a[2] - mx).exp(), (b[2] - mx).exp()
    return a[0] * wa[..., None] + b[0] * wb[..., None], a[1] * wa + b[1] * wb, mx


OP = register(Op(
    decode="per level, the coarse key and value sums of the last three blocks and the current cluster's query",
    family="mha", variant="hierarchical", params=HierarchicalParams, module=HierarchicalAttention,
    causal="yes", shape=hierarchical_shape, supports=frozenset(),
    paper="H-Transformer-1D: Fast One-Dimensional Hierarchical Attention for Sequences, Zhu & Soricut 2021, "
          "arXiv:2107.11906",
    summary="exact attention in each block of Nr and its neighbours; at each coarser level (queries, keys averaged "
            "by pairs, values summed) the neighbour blocks not held below; interpolated back and normalised by the "
            "same hierarchical row sums; O(n Nr d)",
    note="MHA/SparseOrLowRank/005.md", cost=hierarchical_cost,
))
