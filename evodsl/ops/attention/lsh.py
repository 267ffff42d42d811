"""mha(lsh, buckets=B, chunk=m, rounds=R): Reformer's LSH attention with shared QK (Kitaev, Kaiser, Levskaya
2020, arXiv:2001.04451, section 2).

Shared QK: one projection gives the queries q_i; the keys are the queries normalised to unit length, as HF's
and trax's Reformer do it (_len_and_dim_norm: k = q rsqrt(mean(q^2) + 1e-6) / sqrt(dh)); the scores are
q_i . k_j, unscaled. Values have their own projection (kv_heads of them: value heads shared by groups of query
heads, as mha(soft) shares its V; the keys are always the query heads').

Angular LSH, per head and round r: h_r(x) = argmax([x R_r; -x R_r]), R_r a [dh, B/2] Gaussian matrix drawn once
from seed= (the buffer `rotations` [h, R, dh, B/2], which the tests and an importer can set); B = 1 puts every
token in one bucket. In each round the tokens are sorted by (bucket, position), and the sorted sequence is cut
into chunks of m (the last one short: its slots past n are never read). Paper eq. 3-4 with its masks, in round r:

    bidirectional:  query i reads key j iff h_r(i) = h_r(j) and chunk(s_j) in {chunk(s_i) - 1, chunk(s_i)}
    causal:         query i reads key j iff h_r(i) = h_r(j) and s_i - m <= s_j <= s_i

(s_i: i's index in the sorted order). The causal form is our construction: the paper's "j <= i after sorting"
over the chunk and the previous chunk lets future tokens leak in, since a future token in a lower bucket moves
the chunk boundaries and so which past tokens share a chunk (HF's form leaks thus). Here a query reads itself
and the up to m tokens before it in its own bucket, in position order: those never depend on a later token, and
a causal chunk and its previous chunk always hold them. The first chunk has no previous one (no wrap-around).
A token's score with itself is q_i . k_i - 1e5 (the paper's m(i, P_i) = 10^5): it reads itself only when nothing
else is there. o_r(i) = sum_j softmax_j(scores) v_j, L_r(i) = logsumexp_j(scores), and the rounds combine as

    o_i = sum_r exp(L_r(i) - logsumexp_r' L_r'(i)) o_r(i)

without the paper's duplicate-count correction (log N_ij; as HF and trax's default). Softmax is explicit: the
combination needs each round's logsumexp, which F.scaled_dot_product_attention does not give (written out with
its maximum: onnxruntime's ReduceLogSumExp loses a row whose only score is -1e5). O(n R m d) plus the sort,
every query against 2m sorted keys in each round; no n x n tensor. One form, eager and exported: the chunks
along one batch axis [b h R C, m, .] with C = ceil(n/m) + 1 (one chunk past n, unread: C is then a floor that
torch.export can divide C m by, and never 1).

Padding: padded tokens are put in a bucket of their own (B), sorted after every real token: real tokens keep
their sorted order, chunks and keys, so a padded batch equals each sequence alone (padding either side).
Decoding (causal) keeps the queries (the keys' source) and values of every position and re-hashes them each
step: a new query reads, per round, its own bucket's last m earlier tokens, found by a running count.
No position scheme inside; dropout= is refused. The cost: _lsh_cost.py.

form=hf (with before=, after=): HF's LSHSelfAttention, the layout its checkpoints run (_lsh_hf.py): rounds sorted
together, no same-bucket mask, look-adjacent chunks with wrap-around, the self score replaced by -1e5, rotations
drawn as HF's hash_seed draws them, dropout allowed. Causal, it is HF's decoder form: keys masked by position,
but its chunks follow the whole sorted sequence, so a later token can move them (no step form).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ...decode import slot
from ..registry import Op, OpEnv, ShapeProblem, register
from ._common import AttentionBase, AttentionParams, attention_shape
from ._lsh_hf import attend_hf, hf_rotations
from ._lsh_cost import lsh_cost
from .isab import no_dropout_shape

SELF_PENALTY = 1e5  # the paper's m(i, P_i) for a token's own key (float16, whose max is 65504: 1e4)
EPS = 1e-6  # the key normalisation's, as HF's and trax's


class LSHParams(AttentionParams):
    buckets: int = Field(32, ge=1, le=1 << 14, description="B: hash buckets per round (1, or even)")
    chunk: int = Field(64, ge=1, le=1 << 16, description="m: chunk length in the sorted order")
    rounds: int = Field(1, ge=1, le=64, description="R: hash rounds, combined by their logsumexp")
    seed: int = Field(0, ge=0, description="seed of the random rotations")
    form: Literal["paper", "hf"] = Field("paper", description="hf: HF's LSHSelfAttention (_lsh_hf.py)")
    before: int = Field(1, ge=0, le=8, description="form=hf: chunks read before a chunk (lsh_num_chunks_before)")
    after: int = Field(0, ge=0, le=8, description="form=hf: chunks read after a chunk (lsh_num_chunks_after)")


def lsh_shape(p: LSHParams, env: OpEnv):
    if p.buckets > 1 and p.buckets % 2:
        raise ShapeProblem(f"mha(lsh): buckets={p.buckets} is odd; angular LSH takes the argmax of [xR; -xR], "
                           f"an even number of buckets", "buckets", f"use buckets={p.buckets + 1} (or 1: one bucket)")
    if p.form == "paper" and (p.before, p.after) != (1, 0):
        raise ShapeProblem("mha(lsh): before= and after= set the neighbouring chunks of form=hf; the paper form "
                           "reads its own chunk and the one before", "before" if p.before != 1 else "after",
                           "add form=hf, or leave them out")
    if p.form == "hf":
        return attention_shape(p, env)
    return no_dropout_shape("mha(lsh)")(p, env)


def hash_buckets(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """x [b, h, n, dh], rotations [h, R, dh, B/2] -> int64 buckets [b, h, R, n]: argmax([xR; -xR])."""
    if rotations.shape[-1] == 0:  # one bucket
        return x.new_zeros((x.shape[0], x.shape[1], rotations.shape[1], x.shape[2]), dtype=torch.long)
    h, R, dh, half = rotations.shape
    xr = (x @ rotations.permute(0, 2, 1, 3).reshape(h, dh, R * half)).unflatten(-1, (R, half)).transpose(2, 3)
    return torch.cat((xr, -xr), dim=-1).argmax(-1)


def self_penalty(dtype) -> float:
    return SELF_PENALTY if torch.finfo(dtype).max > 1e6 else 1e4


def unit_keys(qk: torch.Tensor) -> torch.Tensor:
    return qk * (torch.rsqrt(qk.pow(2).mean(-1, keepdim=True) + EPS) * qk.shape[-1] ** -0.5)


class LSHAttention(AttentionBase):
    def __init__(self, p: LSHParams, env: OpEnv):
        super().__init__(p, env)
        del self.k_proj  # K = Q, normalised
        self.buckets, self.chunk, self.rounds = p.buckets, p.chunk, p.rounds
        g = torch.Generator().manual_seed(p.seed)
        half = p.buckets // 2 if p.buckets > 1 else 0
        self.form, self.before, self.after = p.form, p.before, p.after
        rotations = (hf_rotations(self.heads, self.head_dim, p.rounds, 2 * half, p.seed) if p.form == "hf" else
                     torch.randn(self.heads, p.rounds, self.head_dim, half, generator=g))
        self.register_buffer("rotations", rotations)

    def forward(self, x, ctx):
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        b, n, _ = x.shape
        qk = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # [b, h, n, dh]
        v = self.expand_kv(self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2))
        buckets = hash_buckets(qk.detach(), self.rotations)  # [b, h, R, n]; no gradient through an argmax
        key_mask = self.key_mask(ctx)
        if self.form == "hf":
            valid = key_mask if key_mask is not None else torch.ones(b, n, dtype=torch.bool, device=x.device)
            o, lse = attend_hf(qk, v, buckets, valid, self.buckets, self.chunk, self.before, self.after,
                               self.causal, self.dropout if self.training else 0.0, unit_keys)
            return self.out(combine_rounds(o, lse))
        if key_mask is not None:  # padding: a bucket of its own, sorted after every token
            buckets = buckets.masked_fill(~key_mask[:, None, None, :], self.buckets)
        o, lse = self.attend(qk, unit_keys(qk), v, buckets)
        return self.out(combine_rounds(o, lse))

    def attend(self, q, k, v, buckets):
        """Each round over its sorted chunks: q, k, v [b, h, n, dh], buckets [b, h, R, n] -> per round the
        outputs [b, h, R, n, dh] and logsumexps [b, h, R, n], at the original positions. Chunks are laid out along
        one batch axis, [b h R C, m, .], with at least two of them (no axis whose size is 1 at some n, which
        torch.export would specialize: the second is then slots past n, never read)."""
        b, h, n, dh = q.shape
        R, m, dev = buckets.shape[2], self.chunk, q.device
        pos = torch.arange(n, device=dev)
        perm = (buckets * n + pos).argsort(-1)  # [b, h, R, n]: sorted by (bucket, position)
        C = (n + 2 * m - 1) // m  # chunks: ceil(n / m) and one past n (a floor: export sees C m / C = m)
        L = C * m
        slots = torch.arange(L, device=dev)
        src = perm[..., slots.clamp(max=n - 1)]  # [b, h, R, L]: the token in each slot (past n: the last, unread)
        # each chunk's keys: the previous chunk's slots, then its own ([C, 2m], flat; -1 where out of the sequence)
        kslot = (slots.view(C, 1, m) + torch.tensor([-m, 0], device=dev).view(1, 2, 1)).flatten()
        ksrc = src[..., kslot.clamp(0, L - 1)]  # [b, h, R, 2L]

        def sort(t, idx, rows):  # t [b, h, n, dh] -> [b h R C, rows, dh] in sorted order
            return t[:, :, None].expand(b, h, R, n, dh).gather(3, idx[..., None].expand(*idx.shape, dh)).unflatten(
                3, (C, rows)).flatten(0, 3)

        kk, vv = sort(k, ksrc, 2 * m), sort(v, ksrc, 2 * m)  # [b h R C, 2m, dh]
        sq = sort(q, src, m)  # [b h R C, m, dh]
        s = torch.bmm(sq, kk.transpose(1, 2))  # [b h R C, m, 2m]
        del kk
        reach = (kslot >= 0) & (kslot < n)  # keys out of the sequence: no bucket
        sb_k = buckets.gather(3, ksrc).masked_fill_(~reach, -1).unflatten(3, (C, 1, 2 * m)).flatten(0, 3)
        i, j = torch.arange(m, device=dev)[:, None], torch.arange(2 * m, device=dev)[None, :] - m
        own = j == i  # [m, 2m]: a key slot's offset from the query's is j - i
        blocked = buckets.gather(3, src).unflatten(3, (C, m, 1)).flatten(0, 3) != sb_k  # [b h R C, m, 2m]
        if self.causal:  # its own bucket, at most m sorted places back
            blocked.logical_or_((j > i) | (j < i - m))
        blocked.logical_and_(~own)  # own: a pad slot's row stays finite
        s.masked_fill_(blocked, float("-inf")).sub_(own.to(s.dtype) * self_penalty(s.dtype))
        w = s.softmax(-1)  # every row reads at least its own key
        top = s.detach().amax(-1, keepdim=True)  # logsumexp written out (onnxruntime's loses a row of -1e5)
        lse = top + (s - top).exp_().sum(-1, keepdim=True).log_()
        del s
        o = torch.bmm(w, vv)  # [b h R C, m, dh]
        del w, vv
        inv = torch.empty_like(perm).scatter_(3, perm, pos.expand_as(perm))  # each token's sorted index
        rows = (inv + torch.arange(b * h * R, device=dev).view(b, h, R, 1) * L).flatten()  # in o's rows
        return (o.flatten(0, 1).index_select(0, rows).unflatten(0, (b, h, R, n)),
                lse.flatten().index_select(0, rows).unflatten(0, (b, h, R, n)))

    def _step(self, x, ctx):
        """Decoding (causal): the cached queries and values of every position and these; all re-hashed; each new
        query reads, per round, the keys of its bucket at most m same-bucket tokens back (a running count)."""
        b, T, _ = x.shape
        qk = self.q_proj(x).view(b, T, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, T, self.kv_heads, self.head_dim).transpose(1, 2)
        old = ctx.cache.caches.get(slot(ctx, self))
        if old is not None:
            qk, v = torch.cat((old[0], qk), dim=2), torch.cat((old[1], v), dim=2)
        ctx.cache.caches[slot(ctx, self)] = (qk, v)
        N = qk.shape[2]
        buckets = hash_buckets(qk, self.rotations)  # [b, h, R, N]
        same = buckets[..., N - T:, None] == buckets[..., None, :]  # [b, h, R, T, N]
        count = same.long().cumsum(-1)  # same-bucket tokens up to each key
        i = torch.arange(N - T, N, device=x.device)[:, None]
        j = torch.arange(N, device=x.device)[None, :]
        mine = count.gather(-1, i.expand(*same.shape[:-1], 1))  # the query's own count
        ok = same & (j <= i) & (mine - count <= self.chunk)
        s = (qk[:, :, None, N - T:] @ unit_keys(qk)[:, :, None].transpose(-1, -2)).expand(ok.shape)
        s = s.masked_fill(~ok, float("-inf"))
        s = s - (j == i).to(s.dtype) * self_penalty(s.dtype)
        lse = s.logsumexp(-1)
        o = (s - lse[..., None]).exp() @ self.expand_kv(v)[:, :, None]
        return self.out(combine_rounds(o, lse))


def combine_rounds(o: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """o [b, h, R, n, dh], lse [b, h, R, n] -> [b, h, n, dh]: each round weighted by exp(L_r - logsumexp_r L)."""
    return (o * lse.softmax(2)[..., None]).sum(2)


def _decode(p: LSHParams):
    if p.form == "hf":  # its chunks follow the whole sorted sequence, later tokens included: no step form
        return None
    return ("the queries (the keys' source: heads heads) and values (kv_heads heads) of every position, re-hashed "
            "each step")


OP = register(Op(
    decode=_decode,
    family="mha", variant="lsh", params=LSHParams, module=LSHAttention,
    causal="yes", shape=lsh_shape, supports=frozenset(),
    paper="Reformer: The Efficient Transformer, Kitaev et al. 2020, arXiv:2001.04451",
    summary="shared QK (keys the unit queries), angular LSH argmax([xR; -xR]) in R rounds; sorted by (bucket, "
            "position), chunks of m read their own and the previous chunk's same-bucket keys (causal: the query's "
            "bucket, up to m tokens back); rounds combined by logsumexp; O(n R m d) plus the sort",
    note="", cost=lsh_cost,
))
