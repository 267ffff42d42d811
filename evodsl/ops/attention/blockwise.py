"""mha(blockwise, blocks=B, identity=I): BlockBERT's blockwise multi-head attention (Qiu et al. 2019/2020).

The sequence of n tokens is split into B blocks, position t in block floor(t B / n) (block j holds positions
ceil(j n / B) .. ceil((j+1) n / B) - 1, so sizes differ by one at most). Head i has a permutation pi_i of the
blocks and its queries of block j attend only the keys of block pi_i(j): with the paper's shift sigma = (2, 3,
.., B, 1), pi_i = sigma^{s_i}, i.e. query block j reads key block (j + s_i) mod B. Per head, with
s_tr = q_t . k_r / sqrt(dh),

    o_t = sum_{r : blk(r) = (blk(t) + s_i) mod B} softmax_r(s_tr) v_r

Shift assignment (the paper's "a:b:c" heads per permutation): the first I heads keep the identity (s = 0); the
other heads - I are split over the shifts 1 .. B-1 in contiguous groups, head I + k taking shift
1 + floor(k (B - 1) / (heads - I)) (B = 2, 12 heads, I = 10: the paper's 10:2; B = 3, I = 8: 8:2:2). identity
unset: the heads are split evenly over the B permutations, head i taking shift floor(i B / heads). O(n^2 d / B).

Bidirectional only: a block reads a whole other block, ahead of it or behind. Padding (right padding; left is
refused, E409): blocks are counted over each sequence's own tokens. A query whose key block holds no token (a
sequence shorter than B) reads its own key. K/V heads (GQA) serve their query heads whatever their shifts.
"""
from __future__ import annotations

import sympy as sp
import torch
import torch.nn.functional as F
from pydantic import Field

from ..cost import Cost, Symbols
from ..registry import Op, OpEnv, ShapeProblem, register, require_right_padding
from ._common import (LSE_BYTES, AttentionBase, AttentionParams, attention_cost, attention_shape, head_symbols)


class BlockwiseParams(AttentionParams):
    blocks: int = Field(2, ge=1, le=4096, description="B: blocks the sequence is split into")
    identity: int | None = Field(None, ge=0, description="heads on the identity permutation (the rest on shifts "
                                                         "1 .. B-1 in contiguous groups); default an even split")


def head_shifts(heads: int, blocks: int, identity: int | None) -> list[int]:
    """s_i for each head: query block j of head i reads key block (j + s_i) mod blocks."""
    if identity is None:
        return [i * blocks // heads for i in range(heads)]
    rest = heads - identity
    return [0] * identity + [1 + k * (blocks - 1) // rest for k in range(rest)]


def blockwise_shape(p: BlockwiseParams, env: OpEnv):
    shape = attention_shape(p, env)
    if p.identity is not None and p.identity > p.heads:
        raise ShapeProblem(f"identity={p.identity} is more than heads={p.heads}", "identity",
                           f"identity counts heads: at most {p.heads}")
    if p.identity is not None and p.identity < p.heads and p.blocks == 1:
        raise ShapeProblem("one block has no other permutation than the identity", "identity",
                           "set blocks >= 2, or leave identity out")
    return shape


class BlockwiseAttention(AttentionBase):
    def __init__(self, p: BlockwiseParams, env: OpEnv):
        super().__init__(p, env)
        self.blocks = p.blocks
        self.register_buffer("shifts", torch.tensor(head_shifts(self.heads, p.blocks, p.identity)), persistent=False)

    def forward(self, x, ctx):
        q, k, v = self.qkv(x)
        b, n = x.shape[:2]
        mask = ctx.mask if ctx is not None else None
        require_right_padding(mask, "mha(blockwise)", "its blocks are counted over each sequence's tokens from the "
                                                      "row's start")
        nb = self.blocks
        lengths = (torch.full((b,), n, device=x.device) if mask is None else mask.sum(-1))[:, None, None]
        j = torch.arange(nb, device=x.device)[:, None]
        start = torch.div(j * lengths + nb - 1, nb, rounding_mode="floor")  # [b, B, 1]: ceil(j len / B)
        size = torch.div((j + 1) * lengths + nb - 1, nb, rounding_mode="floor") - start
        kblock = (torch.arange(nb, device=x.device) + self.shifts[:, None]) % nb  # [h, B]: the key block
        if not isinstance(n, int) or torch.jit.is_tracing():
            return self.out(self._dense(q, k, v, lengths, size, kblock))
        L = -(-n // nb)  # the longest block
        u = torch.arange(L, device=x.device)[None, :]
        pos, valid = (start + u).clamp(max=n - 1), u < size  # [b, B, L]: each block's positions
        rows = torch.arange(b, device=x.device)[:, None, None]
        kblock = torch.where(size[rows, kblock, 0] > 0, kblock, j[:, 0])  # [b, h, B]; empty: the query's own
        kpos, kvalid = pos[rows, kblock], valid[rows, kblock]  # [b, h, B, L]
        heads = torch.arange(self.heads, device=x.device)[None, :, None, None]
        qb = q[rows[..., None], heads, pos[:, None]]  # [b, h, B, L, dh]
        kb, vb = (t[rows[..., None], heads // (self.heads // self.kv_heads), kpos] for t in (k, v))  # its K/V head
        attn_mask = None
        if mask is not None or n % nb:  # the slots past a key block's end out (a row of an empty block: all in)
            attn_mask = (kvalid | ~kvalid.any(-1, keepdim=True)).flatten(1, 2).unsqueeze(2)
        dh = self.head_dim
        o = F.scaled_dot_product_attention(qb.flatten(1, 2), kb.flatten(1, 2), vb.flatten(1, 2),
                                           attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        del qb, kb, vb
        # back to positions, laid out [b, n, h, dh] for o_proj: token t is slot (t - start) of its block
        # floor(t B / len); padding reads slot 0
        t = torch.arange(n, device=x.device)[None, :]
        blk = torch.div(t * nb, lengths[:, 0].clamp(min=1), rounding_mode="floor").clamp(max=nb - 1)
        slot = torch.where(t < lengths[:, 0], blk * L + t - start[:, :, 0].gather(1, blk), 0)  # [b, n]
        o = o.unflatten(1, (self.heads, nb)).flatten(2, 3).transpose(1, 2).gather(1, slot[:, :, None, None].expand(b, n, self.heads, dh))
        return self.o_proj(o.flatten(2))

    def _dense(self, q, k, v, lengths, size, kblock):
        """For a symbolic n (export): SDPA over all n keys with the [b, h, n, n] mask of each query's key block
        (the same O(n^2) class; the block layout's reshapes would tie the exported graph to some n)."""
        b, h, n, dh = q.shape
        nb, rows = self.blocks, torch.arange(b, device=q.device)[:, None, None]
        t = torch.arange(n, device=q.device)[None, :]
        blk = torch.div(t * nb, lengths[:, 0].clamp(min=1), rounding_mode="floor").clamp(max=nb - 1)  # [b, n]
        kb = kblock[:, blk].transpose(0, 1)  # [b, h, n]: each query's key block (empty: its own)
        kb = torch.where(size[rows, kb, 0] > 0, kb, blk[:, None, :])
        ok = (blk[:, None, None, :] == kb[..., None]) & (t < lengths[:, 0])[:, None, None, :]
        ok = ok | ~ok.any(-1, keepdim=True)  # a padded query: any finite row
        return F.scaled_dot_product_attention(q, k, v, attn_mask=ok, dropout_p=self.dropout if self.training else 0.0,
                                              enable_gqa=self.kv_heads != self.heads)

def blockwise_cost(p: BlockwiseParams, env: OpEnv, s: Symbols) -> Cost:
    """SDPA over [b, h*B, L, L] scores, L = ceil(n / B), on q, k, v gathered into blocks ([b, h, B, L, dh] each,
    G bytes; K/V read from their K/V heads), then the output gathered back to [b, n, h, dh] for o_proj. The
    int64 block positions [b, B, L] and key positions [b, h, B, L] (and their bool validity) live through the
    call, and the indexing keeps them; the slots past a shorter block (n not a multiple of B) are masked."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    nb = s.sym("B", p.blocks)
    L = sp.ceiling(n / nb)
    scores = b * h * nb * L ** 2
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    qkv, G, slots = q + 2 * kvb, b * h * nb * L * dh * by, b * h * nb * L
    lse = LSE_BYTES * slots
    masked = sp.Min(1, nb * L - n)  # 1 when n is not a multiple of B: a [b, h*B, 1, L] key mask
    index = 8 * b * nb * L + 8 * slots  # block and key positions (int64)
    core = Cost(fwd=4 * scores * dh, bwd=10 * scores * dh, fwd_other=5 * scores, bwd_other=10 * scores)
    # the kernel's q, k, v, output and logsumexp (the mask in the model's dtype), o_proj's input, the indices
    saved = 4 * G + lse + masked * slots * by + q + index + 8 * b * n
    if p.dropout > 0:  # training runs SDPA's math kernel (float32): q and k scaled, v, the weights, their dropout
        # mask and the dropped weights
        f32 = max(by, 4)
        core = Cost(fwd=4 * scores * dh, bwd=8 * scores * dh, fwd_other=5 * scores, bwd_other=10 * scores)
        saved = (3 * G / by + 3 * scores) * f32 + masked * slots * by + 2 * q + index + 8 * b * n
    phases = [qkv + 4 * G + lse + index + slots * (1 + 1 + masked * (1 + by)) + 9 * b * nb * L,  # the call
              qkv + G + q + 8 * b * n,  # the output gathered back
              qkv + q + out + index + 9 * b * nb * L + slots * (1 + masked) + 8 * b * n]  # at o_proj, the
    # indices still alive
    # backward: o's gradient scattered into the blocks' layout; then the kernel's gradients of the blocked q, k, v
    bwd = [2 * G, 4 * G - q - 8 * b * n] if p.dropout == 0 else [2 * G]
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=0, bwd_phases=bwd)


OP = register(Op(
    decode=None,  # bidirectional only: a block reads whole other blocks, ahead or behind
    family="mha", variant="blockwise", params=BlockwiseParams, module=BlockwiseAttention,
    causal="no", shape=blockwise_shape, cost=blockwise_cost,
    paper="Blockwise Self-Attention for Long Document Understanding, Qiu et al. 2019, arXiv:1911.02972",
    summary="B blocks; head i's query block j attends key block (j + s_i) mod B (BlockBERT's shifted "
            "permutations); O(n^2 d / B)",
    note="MHA/SparseOrLowRank/004.md",
))
