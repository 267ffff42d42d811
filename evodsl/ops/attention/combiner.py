"""mha(combiner, mode=fixed|axial|logsparse, block=s): Combiner (Ren et al. 2021, Combiner: Full Attention Transformer
with Sparse Computation Cost, sections 3-4): Combiner-Fixed as the authors' sqrt_fixed_full, Combiner-Axial as their
axial_rowmajor (combiner/tf/approx_attention.py; the axial form and its choices: _combiner_axial.py),
Combiner-Logsparse as the paper's section 4.2 (_combiner_logsparse.py: its partition and choices; block= unused).

Attention as a conditional expectation, A(x_i) = E_{p(j|i)}[v_j], with p(j|i) factorised over a partition of the
keys into the query's own region Omega_i^0 (read directly) and the other regions Omega_i^r (read through a summary):

    A(x_i) = sum_{j in Omega_i^0} p~(j|i) v_j + sum_{r>=1} p(Omega_i^r|i) sum_{j in Omega_i^r} q(j|Omega_i^r) v_j

    p~(j|i) = exp(q_i.k_j / sqrt(dh)) / Z_i,   p(Omega_r|i) = exp(q_i.k_Omega_r / sqrt(dh)) / Z_i   (one Z_i for both)
    q(j|Omega_r) = softmax_{j in Omega_r}(q_Omega_r.k_j / sqrt(dh))

Every key keeps a non-zero weight (full attention), at O(n (s + n/s) d) cost: O(n sqrt(n) d) for s ~ sqrt(n).
Fixed: the regions are blocks of s positions, Omega_i^0 the query's block; bidirectional, every other block is
summarised; causal (the paper's LM), Omega_i^0 = the keys j <= i of the query's block and only the earlier, finished
blocks are summarised. As the authors' LM config (local_summary='identity-max'): the summary query and key of a
block are the elementwise max of its queries and of its keys (q_Omega, k_Omega), v_Omega = sum_j q(j|Omega) v_j.

Choices where the paper is silent:
- bidirectional: the query's own block is read directly and not summarised as well (the partition of section 3;
  the authors' non-causal sqrt_fixed_full also adds the own block's summary);
- grouped K/V heads: a block's summary query is the max over its tokens and over the query heads of its K/V head,
  so (k_Omega, v_Omega) has kv_heads heads, as the keys and values;
- a last block shorter than s (n no multiple of s) is pooled and read over its tokens only; a block of padding
  alone is never read. Padding: right padding (each row's blocks counted from its first position) equals the
  sequence alone; left padding moves the blocks and is refused (E409). Causal models ignore right padding.
- no position scheme inside (a summary has no single position); dropout= is refused.
One gathered form, eager and exported alike: positions past n (or past a row's tokens) repeat the row's last token
(which leaves the max pools unchanged; they are masked as keys), at least 2 blocks (no axis of size 1 at some n).
Decoding keeps the finished blocks' (k_Omega, v_Omega) and the raw q, k, v of the unfinished block.

Axial (rows of s): the query's row is read directly, every other row (causal: earlier) through the token of the
query's column there, whose key is the region's and whose row-attention output is its value (_combiner_axial.py).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ...decode import slot
from ..registry import Op, OpEnv, ShapeProblem, register, require_right_padding
from ._combiner_axial import axial, axial_step, row_summaries
from ._combiner_cost import combiner_cost
from ._combiner_logsparse import logsparse, logsparse_step
from ._common import AttentionBase, AttentionParams
from .isab import no_dropout_shape


class CombinerParams(AttentionParams):
    mode: Literal["fixed", "axial", "logsparse"] = Field(
        "fixed", description="fixed: blocks of s, the others summarised; axial: rows of s, the others reached through "
                             "the column; logsparse: aligned blocks of 2^l along i's bits, the nearest key direct, the "
                             "span summarised (block= unused)")
    block: int = Field(64, ge=1, le=1 << 16, description="s: positions per block (fixed) or row (axial); ~sqrt(n) for "
                                                         "O(n sqrt n)")
    log_size: bool = Field(False, description="logsparse: add log |Omega| to a span summary's logit (the mass of |Omega| "
                                              "keys equal to k_Omega); the paper's p(Omega|i) has none")


def combiner_shape(p: CombinerParams, env: OpEnv):
    if p.log_size and p.mode != "logsparse":
        raise ShapeProblem("mha(combiner) reads log_size= in mode=logsparse only", "log_size",
                           "remove log_size=, or set mode=logsparse")
    return no_dropout_shape("mha(combiner)")(p, env)


class CombinerAttention(AttentionBase):
    def __init__(self, p: CombinerParams, env: OpEnv):
        super().__init__(p, env)
        self.block, self.mode, self.log_size = p.block, p.mode, p.log_size

    def forward(self, x, ctx):
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        b, n, _ = x.shape
        key_mask = self.key_mask(ctx)
        require_right_padding(key_mask, "mha(combiner)", "its blocks are counted from each row's first position, and "
                                                         "left padding moves the tokens")
        length = None if key_mask is None or self.causal else key_mask.sum(1, keepdim=True)  # [b, 1]
        form = {"fixed": self._fixed, "axial": self._axial, "logsparse": self._logsparse}[self.mode]
        o = form(self.q_proj(x), self.k_proj(x), self.v_proj(x), length)
        return self.o_proj(o[:, :n] if isinstance(n, int) or self.mode != "fixed" else o[:, torch.arange(n, device=x.device)])

    def _blocks(self, t, heads):
        """[b, S, s, heads * dh] (contiguous) -> [b S, heads, s, dh]."""
        return t.reshape(t.shape[0] * t.shape[1], self.block, heads, self.head_dim).transpose(1, 2)

    def _summaries(self, qb, kb, vb, mask=None):
        """Blocks q [B, h, s, dh], k, v [B, kv, s, dh] -> (k_Omega, v_Omega) [B, kv, dh]; mask [B, 1, 1, s]: the
        keys each block's summary reads (None: all)."""
        B, h, s, dh = qb.shape
        qs = qb.unflatten(1, (self.kv_heads, h // self.kv_heads)).amax((2, 3))  # [B, kv, dh]
        vs = F.scaled_dot_product_attention(qs[:, :, None], kb, vb, attn_mask=mask)
        return kb.amax(2), vs[:, :, 0]

    def _fixed(self, qx, kx, vx, length):
        """q, k, v [b, n, C] (the projections' layout) -> o [b, S s, h dh]; length [b, 1]: each row's tokens (a
        right-padded bidirectional batch), or None."""
        b, n, _ = qx.shape
        s, h, kv, dh, dev = self.block, self.heads, self.kv_heads, self.head_dim, qx.device
        # export (a symbolic n): floor(n/s) + 2 blocks, the extra ones padding alone (no axis 1 long at some n)
        S = (n + s - 1) // s if isinstance(n, int) else n // s + 2
        pos = torch.arange(S, device=dev)[:, None] * s + torch.arange(s, device=dev)  # [S, s]
        if length is None:  # positions past n repeat token n - 1 (the max pools unchanged; masked as keys)
            idx = pos.clamp(max=n - 1)
            qg, kg, vg = qx[:, idx], kx[:, idx], vx[:, idx]  # [b, S, s, C]
        else:  # past each row's tokens, its last token
            idx = torch.minimum(pos, length[:, :, None] - 1)
            at = torch.arange(b, device=dev)[:, None, None]
            qg, kg, vg = qx[at, idx], kx[at, idx], vx[at, idx]
        qb, kb, vb = self._blocks(qg, h), self._blocks(kg, kv), self._blocks(vg, kv)
        # per query block (b S of them, row-major): its block u, its row's first block, its row's tokens L
        rows, blk = torch.arange(b, device=dev)[:, None], torch.arange(S, device=dev)
        u = (blk + 0 * rows).view(b * S)[:, None, None, None]  # [b S, 1, 1, 1]
        first = (rows * S + 0 * blk).view(b * S, 1)
        L = n if length is None else (length + 0 * blk).view(b * S)[:, None, None, None]
        i, j, r = torch.arange(s, device=dev)[:, None], torch.arange(s, device=dev), torch.arange(S, device=dev)
        ks, vs = self._summaries(qb, kb, vb, (u * s + j < L) | (j == 0))  # a block of padding alone reads its first
        # each block's keys (values): its own s, then its row's S summaries (gathered) [b S, kv, s + S, dh]
        row = first + r  # [b S, S]
        kc, vc = (torch.cat((t, o[row].transpose(1, 2)), dim=2) for t, o in ((kb, ks), (vb, vs)))
        if self.causal:  # direct: j <= i in the query's block; summaries: the blocks before it
            direct, summ = (j <= i).expand(b * S, 1, s, s), (r < u).expand(b * S, 1, s, S)
        else:  # direct: the block's tokens; summaries: every other block holding a token
            direct, summ = (u * s + j < L).expand(b * S, 1, s, s), ((r != u) & (r * s < L)).expand(b * S, 1, s, S)
        mask = torch.cat((direct, summ), dim=-1)  # [b S, 1, s, s + S]
        o = F.scaled_dot_product_attention(qb, kc, vc, attn_mask=mask, enable_gqa=kv != h)  # [b S, h, s, dh]
        return o.transpose(1, 2).reshape(b, S * s, h * dh)

    def _axial(self, qx, kx, vx, length):
        return axial(self, qx, kx, vx, length)

    def _logsparse(self, qx, kx, vx, length):
        return logsparse(self, qx, kx, vx, length)

    def _step(self, x, ctx):
        """Decoding (causal). The cache: the finished blocks' (k_Omega, v_Omega) [b, kv, F, dh] and the raw q, k, v
        of the unfinished block's R < s tokens ([b, R, C]). A prefill runs the forward; later tokens read the
        summaries and the raw keys of their block with a [T, F + R + T] mask."""
        start, s, kv, dh = ctx.offset, self.block, self.kv_heads, self.head_dim
        b, T, _ = x.shape
        qx, kx, vx = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        old = ctx.cache.caches.get(slot(ctx, self))
        if self.mode == "axial":
            return self._axial_step(qx, kx, vx, ctx, old)
        if self.mode == "logsparse":
            if old is None:  # a prefill runs the forward
                o, cache = self.o_proj(self._logsparse(qx, kx, vx, None)), (qx, kx, vx)
            else:
                o, cache = logsparse_step(self, qx, kx, vx, start, old)
                o = self.out(o)
            ctx.cache.caches[slot(ctx, self)] = cache
            return o
        if old is None:
            o = self.o_proj(self._fixed(qx, kx, vx, None)[:, :T])
            ks, vs = x.new_zeros(b, kv, 0, dh), x.new_zeros(b, kv, 0, dh)
            base = 0
        else:
            ks, vs, qr, kr, vr = old
            base = start - kr.shape[1]
            qx, kx, vx = torch.cat((qr, qx), 1), torch.cat((kr, kx), 1), torch.cat((vr, vx), 1)
        f = kx.shape[1] // s * s  # tokens of blocks finished now
        kn, vn = self._summaries(*(self._blocks(t[:, :f].reshape(b, f // s, s, t.shape[-1]), heads)
                                   for t, heads in ((qx, self.heads), (kx, kv), (vx, kv))))
        ks = torch.cat((ks, kn.view(b, -1, kv, dh).transpose(1, 2)), 2)
        vs = torch.cat((vs, vn.view(b, -1, kv, dh).transpose(1, 2)), 2)
        if old is not None:
            R = kx.shape[1]
            t = torch.arange(start, start + T, device=x.device)[:, None]
            p = base + torch.arange(R, device=x.device)[None, :]
            keep = torch.cat((torch.arange(ks.shape[2], device=x.device)[None, :] < t // s,
                              (p // s == t // s) & (p <= t)), dim=1)
            q = qx[:, -T:].view(b, T, self.heads, dh).transpose(1, 2)
            raw_k, raw_v = (a.view(b, R, kv, dh).transpose(1, 2) for a in (kx, vx))
            o = F.scaled_dot_product_attention(q, torch.cat((ks, raw_k), 2), torch.cat((vs, raw_v), 2),
                                               attn_mask=keep, enable_gqa=kv != self.heads)
            o = self.out(o)
        ctx.cache.caches[slot(ctx, self)] = (ks, vs, qx[:, f:].clone(), kx[:, f:].clone(), vx[:, f:].clone())
        return o

    def _axial_step(self, qx, kx, vx, ctx, old):
        """Axial decoding (_combiner_axial.axial_step); a prefill runs the forward, then caches the finished rows'
        keys and summaries and the unfinished row's raw q, k, v."""
        b, T, _ = qx.shape
        if old is None:
            o = self.o_proj(self._axial(qx, kx, vx, None)[:, :T])
            f = T // self.block * self.block
            kf = kx[:, :f].reshape(b, f, self.kv_heads, self.head_dim).transpose(1, 2)
            cache = (kf, row_summaries(self, qx[:, :f], kx[:, :f], vx[:, :f]), qx[:, f:].clone(), kx[:, f:].clone(),
                     vx[:, f:].clone())
        else:
            o, cache = axial_step(self, qx, kx, vx, ctx.offset, old)
            o = self.out(o)
        ctx.cache.caches[slot(ctx, self)] = cache
        return o


OP = register(Op(
    decode="fixed: the finished blocks' summary keys and values; axial: the finished rows' keys and row-attention "
           "outputs; and the raw q, k, v of the unfinished block or row (< s tokens); logsparse: the raw q, k, v of "
           "every position (each new query pools its spans)",
    family="mha", variant="combiner", params=CombinerParams, module=CombinerAttention,
    causal="yes", shape=combiner_shape, supports=frozenset(),
    paper="Combiner: Full Attention Transformer with Sparse Computation Cost, Ren et al. 2021, arXiv:2107.05768",
    summary="full attention factorised: softmax over the query's own block's keys and one summary key per other "
            "block (causal: earlier blocks), whose value is the block's softmax-weighted mean; axial: the query's row, "
            "and each other row through its column's token (key, row-attention output); O(n (s + n/s) d); logsparse: "
            "aligned blocks of 2^l along the bits of i (causal: the prefix; bidirectional: and the suffix), each "
            "block's nearest key direct and the span between summarised; O(n log n d)",
    note="MHA/Others/003.md", cost=combiner_cost,
))
