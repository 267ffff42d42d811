"""pos(huang) inside mha(softmax): the scores of Huang et al.'s four methods (huang.py has the equations).

Methods 1 to 3 form the scaled scores [b, h, n, L] (queries at positions start.., keys 0..L-1), mask them (padding,
causal) and run the softmax and the weighted sum themselves; method 4's position terms are SDPA's float mask.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._huang_cost import huang_attention_cost
from ._inattention import InAttentionPosition, refuse_own_score_options


def check_huang(p, env) -> None:
    """mha(softmax)'s options that have no form with Huang et al.'s scores, refused."""
    refuse_own_score_options(p, env, "pos(huang)", "its own (q·k and the relative embeddings over sqrt(dh))")


class HuangRelative(InAttentionPosition):
    """Inside attention: the layer's relative embeddings (w [h, k + 1] or [h, 2k + 1]; a [2k + 1, dh])."""

    attends = True  # mha(softmax) hands its forward to attend(), its cost to attention_cost, its checks to check
    attention_cost = staticmethod(huang_attention_cost)
    check = staticmethod(check_huang)
    learned = True

    def __init__(self, p, heads: int, head_dim: int):
        super().__init__()
        self.method, self.k = p.method, p.k
        if p.method in (1, 2):
            self.w = nn.Parameter(torch.ones(heads, p.k + 1 if p.method == 1 else 2 * p.k + 1))
        else:
            a = torch.ones(2 * p.k + 1, head_dim) if p.method == 3 else torch.empty(2 * p.k + 1, head_dim).normal_(0, 0.02)
            self.a = nn.Parameter(a)

    def _band(self, q, k, start: int, causal: bool):
        """Method 3 inside the band: [b, h, n, R], column r + k − 1 holding sum_c q_ic k_{i+r,c} a_rc for the
        offsets r = −(k − 1) .. k − 1 (causal: .. 0); a key index outside 0..L-1 reads a clamped row, never used."""
        n, L = q.shape[2], k.shape[2]
        i = torch.arange(n, device=q.device) + start
        cols = []
        for r in range(1 - self.k, 1 if causal else self.k):
            kr = k.index_select(2, (i + r).clamp(0, L - 1))  # k_{i+r} per query row
            cols.append((q * kr * self.a[r + self.k]).sum(-1))  # elementwise: no [n, dh] x [dh] matvec
        return torch.stack(cols, dim=-1)

    def scores(self, q, k, rel, start: int, causal: bool):
        """The scaled scores [b, h, n, L] of methods 1 to 3, δ = rel [n, L] (clipped)."""
        b, h, n, _ = q.shape
        L = k.shape[2]
        scale = 1 / math.sqrt(q.shape[-1])
        if self.method != 3:
            idx = rel.abs() if self.method == 1 else rel + self.k
            return (q @ k.transpose(-1, -2)).mul_(self.w[:, idx] * scale)
        s = self._band(q, k, start, causal).gather(-1, (rel + self.k - 1).clamp(0, band_width(self.k, causal) - 1)
                                                   .expand(b, h, n, L))
        s = torch.where(rel == -self.k, (q * self.a[0]) @ k.transpose(-1, -2), s)  # j - i <= -k: a_{-k}
        if not causal:
            s = torch.where(rel == self.k, (q * self.a[-1]) @ k.transpose(-1, -2), s)  # j - i >= k: a_k
        return s.mul_(scale)

    def bias(self, q, k, rel):
        """Method 4's position terms (q_i·a_δ + a_δ·k_j) / sqrt(dh), [b, h, n, L]."""
        b, h, n, _ = q.shape
        L = k.shape[2]
        idx = rel + self.k
        c2p = (q @ self.a.t()).gather(-1, idx.expand(b, h, n, L))
        c2p += (k @ self.a.t()).gather(-1, idx.t().expand(b, h, L, n)).transpose(-1, -2)
        return c2p.mul_(1 / math.sqrt(q.shape[-1]))

    def attend(self, att, x: torch.Tensor, ctx) -> torch.Tensor:
        start = 0
        q, k, v = att.qkv(x)
        n = x.shape[1]
        if ctx is not None and ctx.cache is not None:  # decoding: the new queries against every cached key
            from ...decode import append_kv
            start = ctx.offset
            k, v = append_kv(ctx, att, k, v)
            keep = None
        else:
            keep = att.allowed(ctx, n, x.device)  # padding (and the causal mask with it), or None
        L = k.shape[2]
        i = torch.arange(n, device=x.device)[:, None] + start
        j = torch.arange(L, device=x.device)[None, :]
        rel = (j - i).clamp(-self.k, self.k)
        if keep is None and att.causal:
            keep = j <= i
        drop = att.dropout if att.training else 0.0
        kx = att.expand_kv(k)
        if self.method == 4:
            mask = self.bias(q, kx, rel)
            del kx, rel
            if keep is not None:
                mask = mask.masked_fill_(~keep, float("-inf"))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop,
                                               enable_gqa=att.kv_heads != att.heads)
            return att.out(o)
        s = self.scores(q, kx, rel, start, att.causal)
        del kx, rel
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        s = F.dropout(s.softmax(-1), drop)
        return att.out(s @ att.expand_kv(v))

    def extra_repr(self) -> str:
        return f"method={self.method}, k={self.k}"


def band_width(k: int, causal: bool) -> int:
    """Method 3's band columns: the offsets −(k − 1) .. k − 1, or .. 0 when causal."""
    return k if causal else 2 * k - 1
