"""mha(probsparse, factor=c): Informer's ProbSparse self-attention (Zhou et al. 2021, arXiv:2012.07436, sec. 3.1).

Only the u "active" queries attend; the others output the mean of the values. A query's activity is its
sparsity measurement on a sample of keys (eq. 4, with the keys sampled as the paper's Lemma 1 allows):

    M(q_i, K) = max_{j in S_i} s_ij - (1 / U) sum_{j in S_i} s_ij,   s_ij = q_i . k_j / sqrt(dh)
    o_i = sum_j softmax_j(s_ij) v_j   for the u queries of largest M,   o_i = (1 / L) sum_j v_j   for the rest

with u = U = min(c ceil(ln L), L) (the authors' code: n_top = c ceil(ln L_Q), U_part = c ceil(ln L_K), each capped
at the length; L_Q = L_K = L here) and S_i query i's U sampled keys, drawn with replacement as the authors'
torch.randint(L_K, (L_Q, U)), shared by every batch row and head.

Choices where the paper is silent or differs from its code: the sample is a fixed integer hash of (i, slot, seed)
modulo L (sample_index: seeded, deterministic, the same in torch and in the export, so that the test shares it), not
a fresh draw per call; the mean term divides the sampled sum by U (the sample's mean, "max - mean"; the authors'
code divides it by L_K, a different ranking); ties in M are broken by torch.topk; with grouped K/V heads each query
head measures and attends against its K/V head. No causal form: the top-u selection is a competition between all
the queries of the sequence (and the sample reaches every key), so whether query i attends depends on the tokens
after it; Informer's masked decoder form masks the scores but keeps that selection, and decodes in one generative
pass, not step by step, so this op is bidirectional only and has no step form (generate refuses it). Padding: each
sequence's own L (its u, its sample modulo L, its mean of values over its tokens), right padding only (the sample
reads positions from the row start; left padding is refused, E409). rope turns q and k first; dropout= is refused.

How it runs: M without autograd, in chunks of 64 queries whose U sampled keys (gathered per K/V head, [b, kv, C U,
dh]) and scores are written into workspaces allocated once (O(n d + C U d) bytes, never n U d); the top u queries
gathered and one F.scaled_dot_product_attention call of u rows against every key; the mean of V written to every
row, the active rows scattered over it. O(n log n d) time, O(n d) memory (the [n, U] sample aside). A padded batch
and the export measure every query at once ([b, h, n, U, dh] sampled keys, each row its own U slots masked). The export (a symbolic n) runs
u_max = U_max = min(c ceil(ln max_len), ...) slots with those past each row's u masked: the same outputs up to
max_len (a longer input is refused, E410).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from ...diagnostics import Diagnostic, EvoError
from ..registry import Op, OpEnv, ShapeProblem, is_symbolic, register, require_right_padding
from ._common import AttentionBase, AttentionParams
from ._probsparse_cost import MEASURE_CHUNK, probsparse_cost
from .isab import no_dropout_shape


class ProbSparseParams(AttentionParams):
    factor: int = Field(5, ge=1, le=1024, description="c: u = U = c ceil(ln n) active queries and sampled keys")
    max_len: int = Field(4096, ge=2, le=1 << 24, description="the longest sequence (the export's bound on u)")
    seed: int = Field(0, ge=0, le=(1 << 31) - 1, description="seed of the key sample's hash")


def count(c: int, n: int) -> int:
    """u = U = min(c ceil(ln n), n)."""
    return min(c * math.ceil(math.log(n)), n)


def sample_index(n, slots: int, seed: int, length, device) -> torch.Tensor:
    """[.., n, slots] int64: query i's sampled keys, a hash of (i, slot, seed) modulo `length` (an int, or an int64
    tensor [b, 1, 1] of each row's length): with replacement, like torch.randint(L, (L, U))."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(slots, device=device)[None, :]
    x = (i * 1103515245 + j * 2654435761 + (seed + 1) * 40503) % (1 << 31)
    x = (x * 1103515245 + 12345) % (1 << 31)
    return (x // 65536) % length


def probsparse_shape(p: ProbSparseParams, env: OpEnv):
    if env.causal:
        raise ShapeProblem("mha(probsparse) has no causal form: its top-u queries are chosen among the whole "
                           "sequence, so a query's output depends on the tokens after it",
                           hint="use it in a bidirectional model (causal=false), or mha(topk) here")
    return no_dropout_shape("mha(probsparse)")(p, env)


class ProbSparseAttention(AttentionBase):
    def __init__(self, p: ProbSparseParams, env: OpEnv):
        super().__init__(p, env)
        self.factor, self.max_len, self.seed = p.factor, p.max_len, p.seed

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        n = x.shape[1]
        if isinstance(n, int) and not is_symbolic(x) and n > self.max_len:
            raise EvoError([Diagnostic("E410", f"mha(probsparse) takes at most max_len={self.max_len} positions, got {n}",
                                       help="raise max_len= (the export's bound on the active queries)")])
        mask = self.key_mask(ctx)
        require_right_padding(mask, "mha(probsparse)", "its key sample reads positions from each row's start, and "
                                                       "left padding moves the tokens")
        q, k, v = self.qkv(x)
        return self.out(self.attend(q, k, v, mask))

    def attend(self, q, k, v, mask):
        """q [b, h, n, dh], k, v [b, kv, n, dh]; mask bool [b, n] (right padding) or None -> o [b, h, n, dh]."""
        b, h, n, dh = q.shape
        dev, g = q.device, h // self.kv_heads
        exact = isinstance(n, int) and not is_symbolic(q)
        slots = count(self.factor, n if exact else self.max_len)  # u_max = U_max
        head = torch.arange(h, device=dev) // g
        if mask is None and exact:
            length, u = n, None  # every row n long: u = U = slots
        else:  # each row's own length and counts, as tensors
            length = (mask.sum(-1) if mask is not None else torch.ones(b, dtype=torch.long, device=dev) * n)[:, None, None]
            ln = length.to(q.dtype if q.dtype == torch.float64 else torch.float32).log().ceil().long()
            u = torch.minimum(self.factor * ln, length)  # [b, 1, 1]
        scale = 1.0 / math.sqrt(dh)
        if exact and slots == 0:  # n = 1: ln 1 = 0, no active query; the mean of the one value
            mean = v.mean(2, keepdim=True)
            return (mean if g == 1 else mean.index_select(1, head)).expand(b, h, n, dh)
        with torch.no_grad():  # the selection: M on the sample (a discrete choice, no gradient)
            idx = sample_index(n, slots, self.seed, length, dev)  # [n, U] or [b, n, U]
            if u is None:
                m = self._measure(q, k, idx, slots, scale)
            else:  # each row its own U slots: every query at once (the export, padding)
                bi = torch.arange(b, device=dev)[:, None, None, None]
                ks = k[bi, head[None, :, None, None], idx[:, None] if idx.dim() == 3 else idx]  # [b, h, n, U, dh]
                s = (q.unsqueeze(-2) @ ks.transpose(-1, -2)).squeeze(-2) * scale  # [b, h, n, U]
                del ks
                live = (torch.arange(slots, device=dev) < u)[:, None]  # [b, 1, 1, U]: the row's U slots
                m = s.masked_fill(~live, float("-inf")).amax(-1) - s.masked_fill(~live, 0).sum(-1) / u
                m = m.masked_fill(~(torch.arange(n, device=dev) < length[:, :, 0])[:, None], float("-inf"))
                del s
            if not exact:  # u_max may pass n: -inf columns, so that top-k has u_max candidates
                m = F.pad(m, (0, slots), value=float("-inf"))
            val, top = m.topk(slots, dim=-1)  # [b, h, u_max]: the active queries
            if u is not None:
                active = (val > float("-inf")) & (torch.arange(slots, device=dev) < u[:, :, 0, None])
                top = top.masked_fill(~active, 0)
        qt = q.gather(2, top[..., None].expand(b, h, slots, dh))  # [b, h, u, dh]
        keep = None if mask is None else mask[:, None, None, :]
        ot = F.scaled_dot_product_attention(qt, k, v, attn_mask=keep, enable_gqa=g > 1)  # [b, h, u, dh]
        if mask is None:
            mean = v.mean(2, keepdim=True)
        else:
            mean = (v * mask[:, None, :, None].to(v.dtype)).sum(2, keepdim=True) / length[..., None].to(v.dtype)
        mean = mean if g == 1 else mean.index_select(1, head)
        if u is None:
            o = mean.expand(b, h, n, dh).scatter(2, top[..., None].expand(b, h, slots, dh), ot)
            return o
        rows = top.masked_fill(~active, n)  # the inactive slots write to a row past n, cut
        o = mean.expand(b, h, n + 1, dh).scatter(2, rows[..., None].expand(b, h, slots, dh), ot)
        return o[:, :, :n]

    def _measure(self, q, k, idx, slots: int, scale: float) -> torch.Tensor:
        """M [b, h, n] of every query on its U = slots sampled keys idx [n, U], in chunks of MEASURE_CHUNK queries whose
        sampled keys [b, kv, C U, dh] and scores are written into workspaces allocated once (so that the bytes
        allocated in total grow as those held: O(n d + C U d), not n U d); the g query heads of a K/V head share its
        gathered keys."""
        b, h, n, dh = q.shape
        kv = k.shape[1]
        g = h // kv
        C0 = min(MEASURE_CHUNK, n)
        ks_ws, sc_ws = k.new_empty(b * kv * C0 * slots * dh), q.new_empty(b * kv * C0 * g * slots)
        m = q.new_empty(b, kv, n, g)
        for s in range(0, n, MEASURE_CHUNK):
            e = min(s + MEASURE_CHUNK, n)
            C = e - s
            ks = ks_ws[:b * kv * C * slots * dh].view(b, kv, C * slots, dh)
            torch.gather(k, 2, idx[s:e].reshape(1, 1, C * slots, 1).expand(b, kv, C * slots, dh), out=ks)
            qc = q[:, :, s:e].reshape(b, kv, g, C, dh).transpose(2, 3).reshape(b * kv * C, g, dh)
            sc = sc_ws[:b * kv * C * g * slots].view(b * kv * C, g, slots)
            torch.bmm(qc, ks.view(b * kv * C, slots, dh).transpose(1, 2), out=sc)
            sc.mul_(scale)
            del qc
            m[:, :, s:e] = (sc.amax(-1) - sc.sum(-1) / slots).view(b, kv, C, g)
        return m.transpose(2, 3).reshape(b, h, n)


OP = register(Op(
    decode=None,
    family="mha", variant="probsparse", params=ProbSparseParams, module=ProbSparseAttention,
    causal="no", shape=probsparse_shape, supports=frozenset({"rope", "xpos"}),
    paper="Informer: Beyond Efficient Transformer for Long Sequence Time-Series Forecasting, Zhou et al. 2021, "
          "arXiv:2012.07436",
    summary="the u = c ln n queries of largest M = max - mean of their scores on U = c ln n sampled keys attend "
            "(softmax over every key), the rest output mean(V); bidirectional only; O(n log n d)",
    note="", cost=probsparse_cost,
))
