"""mha(tglobal, radius=r, block=l): LongT5's transient global attention (Guo et al. 2021), bidirectional.

Per head, query i reads in one softmax its local keys and the g = floor(n / l) transient global tokens:

    G_a = RMSNorm(sum_{j : blk(j) = a} x_j),   blk(j) = min(floor(j / l), g - 1)   (the tail joins block g - 1)
    s_ij = scale q_i . k_j + b(j - i)            for |i - j| <= r       (b: pos(t5_bias)'s table, or 0)
    s_ia = scale q_i . (G_a W_k) + c(a - blk(i))  for a = 0 .. g - 1     (c: this layer's own bias table)
    o_i  = sum_j softmax(s)_ij v_j + sum_a softmax(s)_ia G_a W_v

with the layer's own k and v projections for the global tokens, RMSNorm as T5's (no mean, a learned weight),
and c bucketed like T5's bidirectional bias by block distance. HF's LongT5TransientGlobalAttention is this
with scale=1.0 (T5 scales nothing); HF shares c with the stack's first layer, as it shares b: here each layer
owns its c (pos(t5_bias) has no second table), so a LongT5 stack is the same function with every layer's c a
copy of the first's. O(n (r + n / l) d): the local band in blocks of queries (_banded.band_blocks), each block's
keys its band and the g global keys, in one SDPA call. No causal form (a global token sums its whole block).
Padding: the global blocks count tokens (blk(j) from the j-th token, padded positions in none, a sequence
reading its own floor(t / l) global tokens), so that a padded batch, right or left, is each sequence alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..position.t5_bias import t5_buckets
from ..registry import Op, OpEnv, ShapeProblem, register
from ._banded import band_blocks
from ._tglobal_cost import tglobal_cost
from ._common import AttentionBase, AttentionParams, attention_shape


class TGlobalParams(AttentionParams):
    radius: int = Field(127, ge=0, le=1 << 20, description="r: query i reads the local keys |i - j| <= r")
    block: int = Field(16, ge=1, le=1 << 20, description="l: tokens summed into one transient global token")
    scale: float | None = Field(None, gt=0, description="score scale; default 1/sqrt(head_dim) (LongT5: 1.0)")
    buckets: int = Field(32, ge=4, le=4096, description="buckets of the global tokens' bias (block distance)")
    max_distance: int = Field(128, ge=2, description="block distances from here on share the last bucket")
    eps: float = Field(1e-6, gt=0, description="eps of the global tokens' RMSNorm")


def tglobal_shape(p: TGlobalParams, env: OpEnv):
    shape = attention_shape(p, env)
    if p.max_distance <= p.buckets // 4:
        raise ShapeProblem(f"max_distance={p.max_distance} does not reach past the {p.buckets // 4} exact block "
                           f"distances", "max_distance", f"set max_distance > {p.buckets // 4}, or fewer buckets")
    return shape


class TransientGlobalAttention(AttentionBase):
    def __init__(self, p: TGlobalParams, env: OpEnv):
        super().__init__(p, env)
        self.radius, self.block, self.scale, self.eps = p.radius, p.block, p.scale, p.eps
        self.buckets, self.max_distance = p.buckets, p.max_distance
        self.global_norm = nn.Parameter(torch.ones(env.d))
        self.global_bias = nn.Parameter(torch.empty(p.buckets, p.heads).normal_(0.0, 0.02))

    def forward(self, x, ctx):
        if self.pos is not None:
            self.pos.bind(ctx)
        q, k, v = self.qkv(x)
        key_mask = self.key_mask(ctx)
        b, n, _ = x.shape
        eager = isinstance(n, int) and not torch.jit.is_tracing()  # else export: a symbolic n
        g = n // self.block
        blk, count = self._blocks(n, key_mask, x.device)  # [b | 1, n] block of each position; tokens [b, 1]
        if not eager:  # two more global slots, masked: no axis of the exported graph is 0 or 1 long at some n
            g = g + 2
        xg = self._global_inputs(x, blk, g, eager)  # [b, g, d]
        if not eager:  # K/V heads repeated before the transpose (a strided view's repeat guards on g)
            kg, vg = (proj(xg).unflatten(-1, (self.kv_heads, 1, self.head_dim)).expand(-1, -1, -1, self.heads //
                      self.kv_heads, -1).reshape(b, g, self.heads, self.head_dim).transpose(1, 2)
                      for proj in (self.k_proj, self.v_proj))
            return self.out(self._gathered(q, k, v, kg, vg, blk, count, key_mask))
        kg, vg = (proj(xg).view(b, g, self.kv_heads, self.head_dim).transpose(1, 2)
                  for proj in (self.k_proj, self.v_proj))
        del xg
        side = self._side_bias(g, x.device)  # [h, g, g]: block of the query, global token
        o = self._attend(q, k, v, kg, vg, side, blk, count, key_mask)
        return self.out(o)

    def _gathered(self, q, k, v, kg, vg, blk, count, key_mask):
        """For a symbolic n (export): each query gathers its W = 2r + 1 keys, [b, h, n, W, dh], and reads the g
        global keys [b, h, g, dh] directly (O(n (r + g) d), shapes that only scale n); the side bias per query.
        The last two of the g global slots hold no block (zeros, masked)."""
        n, dh, r, g = q.shape[2], q.shape[3], self.radius, kg.shape[2]
        k, v = self.expand_kv(k), self.expand_kv(v)  # kg, vg come with every query head
        scale = self.scale or dh ** -0.5
        i = torch.arange(n, device=q.device)[:, None]
        j = i + torch.arange(-r, r + 1, device=q.device)  # [n, W]
        inside, jc = (j >= 0) & (j < n), j.clamp(0, n - 1)
        local = (q.unsqueeze(-2) @ k[:, :, jc].transpose(-1, -2)).squeeze(-2) * scale  # [b, h, n, W]
        if self.pos is not None:
            local = local + self.position_bias(i, j).to(local.dtype)
        qblk = blk.clamp(max=n // self.block - 1).clamp(min=0)  # padded queries: the last block, as _mask
        rel = torch.arange(g, device=q.device) - qblk[..., None]  # [1 | b, n, g]
        side = F.embedding(t5_buckets(rel, False, self.buckets, self.max_distance), self.global_bias)
        glob = (q @ kg.transpose(-1, -2)) * scale + side.permute(0, 3, 1, 2).to(q.dtype)  # [b, h, n, g]
        keep = torch.cat([inside.expand(q.shape[0], n, 2 * r + 1) if key_mask is None else inside & key_mask[:, jc],
                          (torch.arange(g, device=q.device) < (n // self.block if count is None else
                                                               count.div(self.block, rounding_mode="floor")[..., None]))
                          .expand(q.shape[0], n, g)], -1)[:, None]  # [b, 1, n, W + g]
        own = torch.arange(2 * r + 1 + g, device=q.device) == r
        keep = keep | (own & ~keep.any(-1, keepdim=True))
        w = torch.cat([local, glob], -1).masked_fill(~keep, float("-inf")).softmax(-1)
        w = F.dropout(w, self.dropout if self.training else 0.0)
        return (w[..., None, :2 * r + 1] @ v[:, :, jc]).squeeze(-2) + w[..., 2 * r + 1:] @ vg

    def _blocks(self, n: int, key_mask, device):
        """blk(j) of every position [1, n] (no padding), or per sequence [b, n] with padded positions in block g
        (in no global token), and the tokens per sequence [b, 1] (None without padding)."""
        l, g = self.block, n // self.block
        if key_mask is None:
            blk = torch.arange(n, device=device).div_(l, rounding_mode="floor").clamp_(max=g - 1).clamp_(min=0)
            return blk[None], None
        count = key_mask.sum(1, keepdim=True)
        idx = key_mask.cumsum(1) - 1  # the j-th token
        blk = torch.minimum(idx.div(l, rounding_mode="floor"), count.div(l, rounding_mode="floor") - 1)
        return torch.where(key_mask & (blk >= 0), blk, g), count

    def _global_inputs(self, x, blk, g: int, eager: bool = True):
        """G = RMSNorm(the sums of each block's inputs) [b, g, d]: index_add of every position into its block (a
        padded position into a dropped block g)."""
        b, n, d = x.shape
        if not eager:  # a symbolic n (export): a one-hot matmul, O(n g d) as the global part's attention (a
            # scatter's reshapes would tie the graph to some g)
            onehot = torch.arange(g, device=x.device)[:, None] == blk[:, None, :]  # [1 | b, g, n]
            sums = onehot.to(x.dtype).expand(b, g, n) @ x
        elif blk.shape[0] == 1 and g:  # no padding: the whole blocks' sums, the tail added to the last
            sums = x[:, :g * self.block].unflatten(1, (g, self.block)).sum(2)
            if n > g * self.block:
                sums[:, -1] += x[:, g * self.block:].sum(1)
        else:
            rows = (blk + (g + 1) * torch.arange(b, device=x.device)[:, None]).flatten()
            sums = x.new_zeros(b * (g + 1), d).index_add_(0, rows, x.reshape(b * n, d)).view(b, g + 1, d)[:, :g]
        return sums * torch.rsqrt(sums.pow(2).mean(-1, keepdim=True) + self.eps) * self.global_norm

    def _side_bias(self, g: int, device) -> torch.Tensor:
        """c(a - blk) as [h, g, g] (query block, global token), from the 2g - 1 block distances' buckets."""
        if g == 0:
            return self.global_bias.new_zeros(self.heads, 1, 0)  # one row, for the index of every query
        rel = torch.arange(1 - g, g, device=device)
        values = F.embedding(t5_buckets(rel, False, self.buckets, self.max_distance), self.global_bias).t()
        return values.unfold(1, g, 1).flip(1)

    def _attend(self, q, k, v, kg, vg, side, blk, count, key_mask):
        """Blocks of B queries, each against its K band keys and the g global keys, in one SDPA call: the keys
        [b, kv, G, nb, K + g, dh] (G = heads per K/V head), and the additive mask [h | b h, nb, B, K + g]."""
        b, h, n, dh = q.shape
        G = self.heads // self.kv_heads  # query heads per K/V head
        lo, _, B, nb, left, K = band_blocks(n, self.radius, self.radius)
        right = (nb - 1) * B + K - left - n
        keys = [_with_globals(t, tg, B, nb, K, left, right, G) for t, tg in ((k, kg), (v, vg))]
        mask = self._mask(n, lo, B, nb, left, K, side, blk, count, key_mask, q.dtype)
        qb = (F.pad(q, (0, 0, 0, nb * B - n)) if nb * B > n else q).reshape(b, h * nb, B, dh)
        o = F.scaled_dot_product_attention(qb, keys[0], keys[1], attn_mask=mask, scale=self.scale,
                                           dropout_p=self.dropout if self.training else 0.0)
        return o.reshape(b, h, nb * B, dh)[:, :, :n]

    def _tile(self, B: int, K: int, left: int, lo: int, dtype, dev) -> torch.Tensor:
        """The band seen by every block, [B, K] (or [h, B, K] with the position scheme's bias): query a at
        t = left + a, key c at c; 0 (or the bias) where |t - c| <= lo, -inf elsewhere."""
        i, j = torch.arange(left, left + B, device=dev)[:, None], torch.arange(K, device=dev)[None, :]
        bias = self.position_bias(i, j) if self.pos is not None else None
        inband = (i - j).abs() <= lo
        return torch.where(inband, torch.zeros((), dtype=dtype, device=dev) if bias is None else bias.to(dtype),
                           float("-inf"))

    def _mask(self, n, lo, B, nb, left, K, side, blk, count, key_mask, dtype):
        """[1 | b, h nb, B, K + g]: the band's tile (query a of a block at t = left + a, its key c at c), with
        the position scheme's bias, the same in every block; the side bias of each query's block; -inf at the
        keys outside the sequence (or padded, and global tokens a sequence does not have)."""
        h, g, dev = self.heads, side.shape[-1], side.device
        tile = self._tile(B, K, left, lo, dtype, dev).expand(h, B, K)
        pos = torch.arange(nb * B, device=dev)
        start = torch.arange(nb, device=dev)[:, None] * B - left + torch.arange(K, device=dev)  # [nb, K] key positions
        if key_mask is None:  # [h, nb, B, K + g]
            qblk = blk[0].clamp(max=max(g - 1, 0))[pos.clamp(max=n - 1)]
            sides = side.index_select(1, qblk).view(h, nb, B, g).to(dtype)
            mask = torch.cat([tile[:, None].expand(h, nb, B, K), sides], -1)
            del sides
            out = F.pad((start < 0) | (start >= n), (0, g), value=False)[:, None]  # [nb, 1, K + g]
            if g == 0 and nb * B - n > lo:  # padded queries with no key in their band: any finite row (cut)
                out = out & (pos < n).view(nb, B, 1)
            return mask.masked_fill_(out, float("-inf")).view(1, h * nb, B, K + g)
        b = key_mask.shape[0]
        qblk = F.pad(blk, (0, nb * B - n), value=0).clamp(max=max(g - 1, 0))  # [b, nb B]
        sides = side[:, qblk].permute(1, 0, 2, 3).reshape(b, h, nb, B, g).to(dtype)
        mask = torch.cat([tile[None, :, None].expand(b, h, nb, B, K), sides], -1)
        keep = F.pad(F.pad(key_mask, (left, K), value=False).unfold(1, K, B)[:, :nb],
                     (0, g), value=True)  # [b, nb, K + g]
        keep[:, :, K:] &= torch.arange(g, device=dev) < count.div(self.block, rounding_mode="floor")[:, :, None]
        ok = torch.isfinite(mask) & keep[:, None, :, None]
        own = torch.arange(B, device=dev)[:, None] + left == torch.arange(K + g, device=dev)  # [B, K + g]
        ok = ok | (own & ~ok.any(-1, keepdim=True))  # a query with no key reads its own (its output is unread)
        return torch.where(ok, mask, float("-inf")).view(b, h * nb, B, K + g)


def _with_globals(t, tg, B: int, nb: int, K: int, left: int, right: int, G: int) -> torch.Tensor:
    """Each block's K band keys (a view of t [b, kv, n, dh] padded with zeros) and the g global keys tg, for the
    G query heads of each K/V head: one copy, [b, kv G nb, K + g, dh]."""
    b, kv, _, dh = t.shape
    g = tg.shape[2]
    tb = (F.pad(t, (0, 0, left, right)) if left or right else t).unfold(2, K, B).transpose(-1, -2)
    return torch.cat([tb[:, :, None].expand(b, kv, G, nb, K, dh), tg[:, :, None, None].expand(b, kv, G, nb, g, dh)],
                     dim=-2).view(b, kv * G * nb, K + g, dh)


OP = register(Op(
    decode=None,  # bidirectional only: a global token sums its whole block
    family="mha", variant="tglobal", params=TGlobalParams, module=TransientGlobalAttention,
    causal="no", shape=tglobal_shape, supports=frozenset({"t5_bias"}), cost=tglobal_cost,
    paper="LongT5: Efficient Text-To-Text Transformer for Long Sequences, Guo et al. 2021, arXiv:2112.07916",
    summary="local band |i - j| <= r plus n / l transient global tokens (RMSNorm of block sums) in one softmax, "
            "block-distance bias on the global part; O(n (r + n / l) d)",
    note="MHA/SparseOrLowRank/010.md",
))
