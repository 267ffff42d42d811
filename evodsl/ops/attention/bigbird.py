"""mha(bigbird, block=B, window=w, globals=g, random=r, seed=s): BigBird's block-sparse attention, ITC form (Zaheer
et al. 2020), as HF's BigBirdBlockSparseAttention (block_size B, window 3, globals 2, num_random_blocks r).

The sequence is read as nb = ceil(n / B) blocks (the last padded with keys that take no part, as HF pads the
input to a multiple of B). The global blocks G are the first ceil(g/2) and the last floor(g/2) blocks. Per head,
with s_tr = q_t . k_r / sqrt(dh):

    global query block:  o_t = sum_{r < n} softmax_r(s_tr) v_r                        (every key)
    local query block i: o_t = sum_{r in K(i)} softmax_r(s_tr) v_r,
                         K(i) = W(i) u G u R_h(i),  W(i) = blocks i - w//2 .. i + w//2 within 0 .. nb-1

one softmax over every key of those blocks; R_h(i), the r random key blocks of head h and query block i, are
drawn without replacement among the blocks outside W(i) u G (fewer when fewer remain). HF draws them with
np.random.permutation after np.random.seed(layer index) -- only in training: in eval mode its
_bigbird_block_rand_mask(_with_head) return all zeros, so each random block is block 0 again (a duplicate of the
first global block, counted r + 1 times in the softmax); deterministic, but no longer random attention. Here the
draw is a pure function of (seed, head, query block, nb), computed by integer tensor ops (a multiplicative hash
and Floyd's sampling, random_blocks), so training, eval, the float64 reference and an exported graph (a symbolic
n) read the same pattern; every layer with the same seed shares it. Same q, k, v and o projections for every
query (HF's ITC: no separate global projections).

Computed in O(n (w + g + r) B d): one gather of the S = w + g + r key blocks of each local query block
([b, h nb', S B, dh]), one SDPA call over the local blocks with a [b | 1, h nb', 1, S B] mask, and one over the
g B global queries against all n keys. No causal form (global blocks read everything).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from ..registry import Op, OpEnv, ShapeProblem, register
from ._bigbird_cost import bigbird_cost
from ._common import AttentionBase, AttentionParams, attention_shape

_MUL, _ADD, _MOD = 1103515245, 12345, 1 << 31  # an LCG step (glibc's constants) mixes the hash


class BigBirdParams(AttentionParams):
    block: int = Field(64, ge=1, le=1 << 16, description="B: positions per block (HF's block_size)")
    window: int = Field(3, ge=1, le=1 << 12, description="w (odd): key blocks i - w//2 .. i + w//2 (HF: 3)")
    globals: int = Field(2, ge=0, le=1 << 10, description="g: the first ceil(g/2) and last floor(g/2) blocks read "
                                                          "and are read by all (HF: 2)")
    random: int = Field(3, ge=0, le=1 << 10, description="r: random key blocks per query block (HF's "
                                                         "num_random_blocks)")
    seed: int = Field(0, ge=0, lt=1 << 31, description="fixes the random blocks (a pure function of it)")


def bigbird_shape(p: BigBirdParams, env: OpEnv):
    shape = attention_shape(p, env)
    if p.window % 2 == 0:
        raise ShapeProblem(f"window={p.window} is even", "window",
                           f"the window is w//2 blocks each side of the query's own: use window={p.window - 1} or "
                           f"{p.window + 1} (HF's is 3)")
    return shape


def _hash(seed: int, head: torch.Tensor, row: torch.Tensor, slot: int) -> torch.Tensor:
    """A pseudo-random int in [0, 2^31) per (head, row): rounds of an LCG step and a 15-bit rotation of 31-bit
    ints, int64 ops that export (no overflow: < 2^62)."""
    x = torch.full_like(row, seed)[None] + 0 * head
    for v in (head, row, slot, 0, 0):
        x = ((x + v + 1) * _MUL + _ADD) % _MOD
        x = (x % (1 << 16)) * (1 << 15) + torch.div(x, 1 << 16, rounding_mode="floor")
    return x


def random_blocks(nb, heads: int, r: int, window: int, first: int, last: int, seed: int, device, rows=None):
    """(blocks [h, nb - first - last, r] long, valid bool of the same shape): for each head and local query block
    i (first .. nb - last - 1), r distinct blocks drawn among the m(i) outside its window and the global blocks
    (Floyd's algorithm over the candidates' ranks; the slots beyond m(i) invalid). rows: the query blocks i
    instead (a long tensor of local blocks; repeats allowed)."""
    i = torch.arange(first, nb - last, device=device) if rows is None else rows
    lo, hi = (i - window // 2).clamp(min=first), (i + window // 2).clamp(max=nb - last - 1)
    a = lo - first  # candidates first .. lo-1, then hi+1 .. nb-last-1
    m = a + (nb - last - 1 - hi)
    head = torch.arange(heads, device=device)[:, None]
    chosen = []
    for s in range(r):
        j = m - r + s  # Floyd: a rank in 0 .. j, or j itself if taken
        t = _hash(seed, head, i, s) % (j + 1).clamp(min=1)
        taken = torch.zeros_like(t, dtype=torch.bool)
        for c in chosen:
            taken = taken | (c == t)
        chosen.append(torch.where(j < 0, -1, torch.where(taken, j, t)))
    if not chosen:
        return i.new_zeros(heads, i.shape[0], 0), torch.zeros(heads, i.shape[0], 0, dtype=torch.bool, device=device)
    rank = torch.stack(chosen, -1)  # [h, R, r]
    valid = rank >= 0
    blocks = torch.where(rank < a[:, None], first + rank, hi[:, None] + 1 + rank - a[:, None])
    return torch.where(valid, blocks, i[:, None]), valid


class BigBirdAttention(AttentionBase):
    def __init__(self, p: BigBirdParams, env: OpEnv):
        super().__init__(p, env)
        self.block, self.window, self.random, self.seed = p.block, p.window, p.random, p.seed
        self.first, self.last = (p.globals + 1) // 2, p.globals // 2

    def random_blocks(self, nb, device, rows=None):
        return random_blocks(nb, self.heads, self.random, self.window, self.first, self.last, self.seed, device,
                             rows)

    def slots(self, nb, device, rows=None):
        """(blocks [h, R, S], valid [h, R, S]) for the R = nb - g local query blocks (or the blocks `rows`): the w
        window blocks (invalid outside the sequence or at a global block), the g global blocks, the r random ones."""
        first, last, half = self.first, self.last, self.window // 2
        i = torch.arange(first, nb - last, device=device) if rows is None else rows
        win = i[:, None] + torch.arange(-half, half + 1, device=device)
        win_ok = (win >= first) & (win < nb - last)
        glob = torch.cat([torch.arange(first, device=device), torch.arange(nb - last, nb, device=device)])
        rnd, rnd_ok = self.random_blocks(nb, device) if rows is None else self.random_blocks(nb, device, rows)
        h, R = self.heads, i.shape[0]
        blocks = torch.cat([torch.where(win_ok, win, i[:, None]).expand(h, R, -1),
                            glob.expand(h, R, -1), rnd], -1)
        valid = torch.cat([win_ok.expand(h, R, -1), torch.ones(h, R, glob.shape[0], dtype=torch.bool, device=device),
                           rnd_ok], -1)
        return blocks, valid

    def forward(self, x, ctx):
        b, n, _ = x.shape
        B, h, kv = self.block, self.heads, self.kv_heads
        nb, g = (n + B - 1) // B, self.first + self.last  # not -(-n // B): ONNX Div truncates
        if not isinstance(n, int):  # export: one graph for every n, so at least g + 1 blocks (padding), where the
            nb = torch.sym_max(nb, g + 1)  # one local block reads all the others: full attention, as eager's below
        N = nb * B
        q, k, v = self.qkv(x)
        key_mask = self.key_mask(ctx)
        dropout = self.dropout if self.training else 0.0
        if isinstance(nb, int) and nb <= g:  # every block global: full attention
            mask = None if key_mask is None else key_mask[:, None, None, :]
            return self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                           enable_gqa=kv != h))
        pad = not isinstance(n, int) or N != n  # a symbolic n (export): always the padded form
        keep = None  # bool [b | 1, N]: the real, unpadded keys
        if key_mask is not None or pad:
            keep = torch.arange(N, device=x.device)[None] < n
            keep = keep if key_mask is None else keep & F.pad(key_mask, (0, N - n), value=False)
        q, k, v = (F.pad(t, (0, 0, 0, N - n)) if pad else t for t in (q, k, v))
        y = self._local_rows(q, k, v, keep, nb, dropout, every=not isinstance(n, int))
        if g:  # the global blocks' rows around the local ones
            og = self._global_rows(q, k, v, keep, N, dropout)
            y = torch.cat([og[:, :, :self.first * B], y, og[:, :, self.first * B:]], 2)
            del og
        if not isinstance(n, int):  # export: the first n rows by a gather (n <= N is beyond torch.export's algebra)
            return self.out(y.index_select(2, torch.arange(n, device=x.device)))
        return self.out(y[:, :, :n] if pad else y)

    def _global_rows(self, q, k, v, keep, N, dropout):
        """The g B queries of the global blocks against every key: [b, h, g B, dh]."""
        B = self.block
        qg = torch.cat([q[:, :, :self.first * B], q[:, :, N - self.last * B:]], 2)
        mask = None if keep is None else keep[:, None, None, :]
        return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, dropout_p=dropout,
                                              enable_gqa=self.kv_heads != self.heads)

    def _local_rows(self, q, k, v, keep, nb, dropout, every: bool = False):
        """Each local query block against its S key blocks: [b, h, R B, dh]. Eager: one SDPA call over [b, h R]
        blocks. every (export, a symbolic n): every one of the nb blocks as a query block, a global one reading as
        its nearest local one does (rows thrown away), blocks an axis of their own and SDPA's math written out
        (the exporter lowers 4-d SDPA only): no tensor has a dimension of nb - g, whose size 1 would make
        torch.export specialize (nb >= g + 1 >= 2 is known to it; nb - g >= 2 is not)."""
        b, _, N, dh = q.shape
        B, h, kv = self.block, self.heads, self.kv_heads
        rows = torch.arange(nb, device=q.device).clamp(self.first, nb - self.last - 1) if every else None
        blocks, valid = self.slots(nb, q.device, rows)  # [h, R, S]
        R, S = blocks.shape[1], blocks.shape[2]
        head = torch.arange(h, device=q.device)[:, None, None] // (h // kv)  # each query head's K/V head
        ok = valid[..., None].expand(h, R, S, B)[None]  # [1 | b, h, R, S, B]
        if keep is not None:
            ok = ok & keep.unflatten(1, (nb, B))[:, blocks]
            own = torch.arange(S, device=q.device)[:, None] == self.window // 2  # the query's own block
            ok = ok | (own & ~ok.flatten(-2).any(-1)[..., None, None])  # a block of padding reads itself
        mask = torch.zeros(ok.shape, dtype=q.dtype, device=q.device).masked_fill_(~ok, float("-inf"))
        if every:
            kb, vb = (t.unflatten(2, (nb, B))[:, head, blocks].flatten(3, 4) for t in (k, v))  # [b, h, nb, S B, dh]
            w = (q.unflatten(2, (nb, B)) @ kb.transpose(-1, -2) * dh ** -0.5 + mask.flatten(3, 4).unsqueeze(3))
            o = (F.dropout(w.softmax(-1), dropout) @ vb).flatten(2, 3)
            return o[:, :, self.first * B:N - self.last * B]
        flat = (head * nb + blocks).flatten()
        kb, vb = (t.reshape(b, kv * nb, B, dh).index_select(1, flat).view(b, h * R, S * B, dh) for t in (k, v))
        qb = q[:, :, self.first * B:N - self.last * B].reshape(b, h * R, B, dh)
        mask = mask.view(mask.shape[0], h * R, 1, S * B)
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout)
        return o.reshape(b, h, R * B, dh)

OP = register(Op(
    decode=None,  # bidirectional only: the global blocks read every position
    family="mha", variant="bigbird", params=BigBirdParams, module=BigBirdAttention,
    causal="no", shape=bigbird_shape, cost=bigbird_cost, pad_alone=False,
    paper="Big Bird: Transformers for Longer Sequences, Zaheer et al. 2020, arXiv:2007.14062",
    summary="blocks of B queries read w window blocks, g global blocks (first and last, which read all) and r "
            "seeded random blocks, one softmax; O(n (w + g + r) B d)",
    note="",
))
