"""xattn(merged, kv=NAME): merged attention (Zhang, Titov & Sennrich 2019, Improving Deep Transformer with
Depth-Scaled Initialization and Merged Attention, arXiv:1908.11365, section 5): the decoder's self-attention and
its encoder-decoder attention in one sublayer, summed before one output projection. For the decoder stream S
([b, m, d]) and the encoder's output H ([b, n, d]):

    MAtt(S) = SAAN(S) + ATT(S, H)
    SAAN(S)_i   = W_o (1/i) sum_{k<=i} W_v s_k                      (the simplified average attention network)
    ATT(S, H)_i = W_o softmax((W_q s_i)(W_k H)^T / sqrt(dh)) (W_v H)  (per head, as xattn(softmax))

and the block around it is the spec's: `residual(xattn(merged, kv=src), norm=post)` is the paper's
S~ = LN(S + MAtt(S)), one residual for both attentions. The simplified AAN is AAN without its FFN and gates
(mixer(average) is the full one): the running average of the value projection of the decoder's own inputs.
Where the paper is silent, the authors' code (bzhangGo/zero, func.dot_attention with fuse_mask) decides: W_v is
shared between the average and the cross-attention (their "v_map" applied to both S and H), and so is W_o; the
average is per head on the value heads (with grouped K/V heads, kv_heads < heads, each value head's average is
added to every query head of its group, as its cross-attention values are read). So the op has the parameters of
xattn(softmax) and no others. The average is causal in a causal stream (the paper's decoder: the cumulative
average, a cumulative sum divided by the count, O(m d) and no m x m tensor) and the row's mean in a bidirectional
one (our construction). The source is an encoder's output in the paper; a causal source is read as xattn(softmax)
reads one (the queries are its last m positions, query i reads keys j <= i + n - m). The source must be as wide as
the stream (W_v reads both).

Padding: the source's padded keys get no weight (as xattn); the stream's padded positions are left out of the
averages' sums and counts, so left and right padding give each sequence alone. Decoding keeps the source's K/V
(computed once, at the prompt) and the running sum of W_v s_k with its count: the self part's state is constant
in the decoded length (the point of the paper's merging: no self-attention K/V cache).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...decode import slot
from ...diagnostics import Diagnostic, EvoError
from ..registry import Op, OpEnv, ShapeProblem, register
from ._merged_cost import merged_cost
from .softmax import CrossAttention, CrossAttentionParams
from .softmax import _shape as cross_shape


class MergedParams(CrossAttentionParams):
    pass


def _shape(p: MergedParams, env: OpEnv):
    out = cross_shape(p, env)
    if env.in_shapes[1][-1] != env.d:
        raise ShapeProblem(f"xattn(merged) shares W_v between this stream (d={env.d}) and '{p.kv}' "
                           f"(d={env.in_shapes[1][-1]})", "kv", "give both streams the same d_model")
    return out


class MergedAttention(CrossAttention):
    def __init__(self, p: MergedParams, env: OpEnv):
        super().__init__(p, env)
        self.self_causal = env.causal  # the stream's own order: the cumulative average, or the row's mean

    def forward(self, x: torch.Tensor, ctx, kv: torch.Tensor) -> torch.Tensor:
        b, m, _ = x.shape
        n = kv.shape[1]
        q = self.q_proj(x).view(b, m, self.heads, self.head_dim).transpose(1, 2)
        decoding = ctx is not None and ctx.cache is not None
        state = ctx.cache.caches.get(slot(ctx, self)) if decoding else None
        if state is not None:  # the source's K/V, computed at the prompt
            k, v = state[0], state[1]
        else:
            k = self.k_proj(kv).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(kv).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        # the average first: its backward then runs after the kernel's, once SDPA's saved tensors are released
        vx = self.v_proj(x)  # [b, m, kv_heads dh]: W_v on the stream's own inputs
        if decoding:
            avg, sums, seen = self._running(vx, state)
            ctx.cache.caches[slot(ctx, self)] = (k, v, sums, seen)
        else:
            avg = self._average(vx, ctx.mask if ctx is not None else None)
        del vx
        avg = avg.view(b, m, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.kv_heads != self.heads:
            avg = avg.repeat_interleave(self.heads // self.kv_heads, dim=1)
        if self.causal and isinstance(m, int) and isinstance(n, int) and m > n:
            raise EvoError([Diagnostic("E410", f"xattn(merged, kv={self.kv_stream}) has {m} queries but {n} keys in "
                                               f"a causal stream", help="at most as many queries as the stream has")])
        keep = self._allowed(ctx, m, n, x.device)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=self.causal and keep is None, scale=self.scale,
                                           enable_gqa=self.kv_heads != self.heads)
        return self.out(o + avg)

    def _average(self, vx: torch.Tensor, mask) -> torch.Tensor:
        """The simplified AAN: (1/i) sum_{k<=i} vx_k over the stream's tokens (causal), or every position's mean."""
        y = vx if mask is None else vx * mask[..., None].to(vx.dtype)  # padding out of the sums
        if not self.self_causal:
            count = vx.shape[1] if mask is None else mask.sum(1).clamp(min=1)[:, None, None].to(vx.dtype)
            return (y.sum(1, keepdim=True) / count).expand_as(vx)
        if mask is None:
            count = torch.arange(1, vx.shape[1] + 1, device=vx.device, dtype=vx.dtype)[:, None]
        else:  # tokens so far (a padded position before every token divides by 1: finite, read by no token)
            count = mask.cumsum(1).clamp(min=1)[..., None].to(vx.dtype)
        return y.cumsum(1) / count

    def _running(self, vx: torch.Tensor, state):
        """Decoding: the running sum [b, 1, kv_heads dh] and count of the positions so far continue the average."""
        sums = vx.cumsum(1)
        seen = 0
        if state is not None:
            sums, seen = sums + state[2], state[3]
        count = torch.arange(seen + 1, seen + vx.shape[1] + 1, device=vx.device, dtype=vx.dtype)[:, None]
        return sums / count, sums[:, -1:].clone(), seen + vx.shape[1]


OP = register(Op(
    decode="the source's K/V, computed once at the prompt, and the running sum of W_v s (kv_heads dh a row) with "
           "its count",
    family="xattn", variant="merged", params=MergedParams, module=MergedAttention, causal="yes",
    shape=_shape, streams=("kv",),
    paper="Improving Deep Transformer with Depth-Scaled Initialization and Merged Attention, Zhang et al. 2019, "
          "arXiv:1908.11365",
    summary="W_o (mean_{k<=i} W_v s_k + softmax(W_q s_i (W_k H)^T / sqrt(dh)) W_v H): the simplified AAN and "
            "cross-attention to H (the stream kv) in one sublayer, W_v and W_o shared",
    note="Normalize_And_Residual/003.md", cost=merged_cost,
))
