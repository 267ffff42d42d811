"""mha(nsa, block=l, stride=d, select_block=l', topk=n, window=w): Native Sparse Attention (Yuan et al. 2025,
arXiv:2502.11089): three branches over the same q, k, v, mixed by gates,

    o_t = g_t^cmp Attn(q_t, K~_t, V~_t) + g_t^slc Attn(q_t, K_t^slc, V_t^slc) + g_t^win Attn(q_t, K_{t-w+1..t}),
    g_t = sigmoid(W_g x_t + b_g) in R^{3 h}   (one gate per head per branch)

- Compression: K~_i = phi_k(k_{id .. id+l-1}), V~_i = phi_v(..) (_nsa_branches.BlockCompressor: an MLP over the
  block with a learned intra-block position encoding); query t reads the blocks that end at or before it,
  i d + l - 1 <= t: p_t^cmp = softmax(q_t K~^T / sqrt(dh)). A query before the first complete block (t < l - 1)
  reads none: its compression output is 0.
- Selection: p^cmp mapped to selection blocks of l' tokens (the paper's eq. 9, overlap_table), summed over the
  heads of a GQA group (one selection per K/V head); the topk blocks by that importance, the initial block and
  the two local ones (the query's own block and the one before it) always among them; full softmax attention
  over the selected blocks' tokens up to t (gathered: S = topk l' keys per query, never n x n).
- Sliding window: keys t-w+1 .. t (mha(local)'s banded kernel).

Choices where the paper is silent: k and v are one projection shared by the three branches (the paper gives each
branch its own, "to prevent shortcut learning"; fla-org's and lucidrains' code share them, as here); phi is
W2 relu(W1 vec(k_block + P) + b1) + b2 with a hidden width dh, one per K and V, shared by the K/V heads; the gate
is one linear layer; the importance is computed without gradient (the top-n choice has none); ties in it go to
torch.topk's order. l' and l must be multiples of d (the paper's condition for eq. 9).

Bidirectional (our form; the paper's model is a decoder): every query reads every complete compressed block,
selects among all selection blocks (the same forced three) and every key of them, and the window |t - r| < w.
Padding: right padding only (blocks are counted from each row's start); a padded block, selection block or key is
never read. Decoding keeps every raw k, v (selection and window) and the compressed blocks, appended as blocks
complete. No position scheme inside (a compressed block has no single position). Cost: _nsa_cost.py.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ...decode import slot
from ..registry import Op, OpEnv, ShapeProblem, register, require_right_padding
from ._banded import banded_attention
from ._common import AttentionBase, AttentionParams
from ._nsa_branches import BlockCompressor, compressed_attention, compressed_count, selection_importance
from ._nsa_select import selected_attention
from ._nsa_cost import nsa_cost
from .isab import no_dropout_shape


class NSAParams(AttentionParams):
    block: int = Field(32, ge=1, le=1 << 16, description="l: tokens per compression block")
    stride: int = Field(16, ge=1, le=1 << 16, description="d: stride between compression blocks (divides l and l')")
    select_block: int = Field(64, ge=1, le=1 << 16, description="l': tokens per selection block")
    topk: int = Field(16, ge=3, le=4096, description="n: selection blocks per query (the initial and 2 local ones included)")
    window: int = Field(512, ge=1, le=1 << 20, description="w: the sliding window, keys t-w+1 .. t")


def nsa_shape(p: NSAParams, env: OpEnv):
    for field, size, name in (("block", p.block, "block"), ("select_block", p.select_block, "select_block")):
        if size % p.stride:
            raise ShapeProblem(f"{name}={size} is not a multiple of stride={p.stride}", field,
                               "NSA maps compression blocks to selection blocks by stride-d segments (the paper's "
                               "eq. 9): block and select_block must be multiples of stride")
    return no_dropout_shape("mha(nsa)")(p, env)


class NativeSparseAttention(AttentionBase):
    def __init__(self, p: NSAParams, env: OpEnv):
        super().__init__(p, env)
        self.block, self.stride, self.select, self.topk, self.window = (p.block, p.stride, p.select_block, p.topk,
                                                                        p.window)
        self.k_compress = BlockCompressor(p.block, self.head_dim, p.bias)
        self.v_compress = BlockCompressor(p.block, self.head_dim, p.bias)
        self.gate = nn.Linear(env.d, 3 * self.heads, bias=p.bias)

    def forward(self, x, ctx):
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        q, k, v = self.qkv(x)
        key_mask = self.key_mask(ctx)
        require_right_padding(key_mask, "mha(nsa)", "its blocks are counted from each row's first position, and left "
                                                    "padding moves the tokens")
        N = k.shape[2]
        M = compressed_count(N, self.block, self.stride)
        kc, vc = self.k_compress(k, 0, M, self.stride), self.v_compress(v, 0, M, self.stride)
        lo = self.window - 1
        win = banded_attention(q, self.expand_kv(k), self.expand_kv(v), lo, 0 if self.causal else lo,
                               key_mask=key_mask)
        return self._mix(x, q, k, v, kc, vc, 0, key_mask, win)

    def _mix(self, x, q, k, v, kc, vc, start, key_mask, win):
        """The compression and selection branches for queries start .. (keys 0 .. N-1), gated with `win`."""
        N, T = k.shape[2], q.shape[2]
        t = torch.arange(T, device=q.device) + start
        last = t if self.causal else torch.full_like(t, N - 1)
        key_ok = None
        if key_mask is not None:  # a compressed block is read when its last token is one
            end = torch.arange(kc.shape[2], device=q.device) * self.stride + (self.block - 1)
            key_ok = key_mask[:, end.clamp(max=N - 1)]
        cmp, p = compressed_attention(self, q, kc, vc, last, key_ok)
        with torch.no_grad():
            imp, valid = selection_importance(self, p.detach(), N, t, last, key_mask)
            idx = imp.topk(self.topk, dim=-1).indices
        slc = selected_attention(self, q, k, v, idx, valid, t, last, key_mask)
        b = x.shape[0]
        g = torch.sigmoid(self.gate(x)).view(b, T, 3, self.heads).permute(2, 0, 3, 1)[..., None]  # [3, b, h, T, 1]
        return self.out(g[0] * cmp + g[1] * slc + g[2] * win)

    def _step(self, x, ctx):
        """Decoding (causal): the cache holds every raw k, v ([b, kv, N, dh]) and the compressed blocks; the new
        queries read them, the blocks completed by the new tokens compressed and appended first."""
        start = ctx.offset
        q, k, v = self.qkv(x)
        old = ctx.cache.caches.get(slot(ctx, self))
        if old is not None:
            k, v = torch.cat((old[0], k), dim=2), torch.cat((old[1], v), dim=2)
        N = k.shape[2]
        M0 = 0 if old is None else old[2].shape[2]
        M = compressed_count(N, self.block, self.stride)
        kc, vc = self.k_compress(k, M0, M - M0, self.stride), self.v_compress(v, M0, M - M0, self.stride)
        if old is not None:
            kc, vc = torch.cat((old[2], kc), dim=2), torch.cat((old[3], vc), dim=2)
        if old is None:  # a prompt: the forward's band
            win = banded_attention(q, self.expand_kv(k), self.expand_kv(v), self.window - 1, 0)
        else:  # new tokens against the keys of their windows, [T, T + w - 1] at most
            first = max(0, start - self.window + 1)
            i = torch.arange(start, N, device=x.device)[:, None]
            j = torch.arange(first, N, device=x.device)[None, :]
            win = torch.nn.functional.scaled_dot_product_attention(
                q, k[:, :, first:], v[:, :, first:], attn_mask=(j <= i) & (j > i - self.window),
                enable_gqa=self.kv_heads != self.heads)
        ctx.cache.caches[slot(ctx, self)] = (k, v, kc, vc)
        return self._mix(x, q, k, v, kc, vc, start, None, win)


OP = register(Op(
    decode="every raw key and value (kv_heads heads) and the compressed blocks, appended as blocks complete",
    family="mha", variant="nsa", params=NSAParams, module=NativeSparseAttention,
    causal="yes", shape=nsa_shape, supports=frozenset(),
    paper="Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention, Yuan et al. 2025, "
          "arXiv:2502.11089",
    summary="gated sum of attention over MLP-compressed blocks (l, stride d), over the top-n selection blocks "
            "(l' tokens) ranked by the compressed scores, and over a sliding window w; O(n (n/d + topk l' + w) d)",
    note="", cost=nsa_cost,
))
