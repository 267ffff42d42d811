"""SRU++'s attention sublayer (Lei 2021, "When Attention Meets Fast Recurrence", arXiv:2102.12459, Section 3.2), which
replaces SRU's input projection W x in rnn(sru, attention=true):

    Q = W_q x                                   [b, n, p]   (p = proj: the paper's d' = d / 4)
    K, V = W_k Q, W_v Q                         one Linear(p, 2 p)
    A = softmax(Q K^T / sqrt(p) + causal mask) V           one head, F.scaled_dot_product_attention
    U = W_o (Q + alpha A)                       [b, n, 3 d]: z, u, s of the recurrence; alpha a learned scalar

alpha starts at 0 (the authors' code: the sublayer starts as SRU with a low-rank W = W_o W_q). Decoding keeps K and V
of every position (append_kv): a state that grows with the length, b 2 p n, declared as such. Padding: padded keys
get no weight; a padded query keeps its own key (no empty row), and the recurrence ignores its output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...decode import append_kv


class SRUAttention(nn.Module):
    def __init__(self, d: int, proj: int):
        super().__init__()
        self.q = nn.Linear(d, proj, bias=False)
        self.kv = nn.Linear(proj, 2 * proj, bias=False)
        self.o = nn.Linear(proj, 3 * d, bias=False)
        self.alpha = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        q = self.q(x)
        k, v = self.kv(q).unsqueeze(1).chunk(2, -1)  # [b, 1, n, p]
        cache = None if ctx is None else ctx.cache
        if cache is not None:
            k, v = append_kv(ctx, self, k, v)
        n, L = q.shape[1], k.shape[2]
        keep = None if ctx is None or ctx.mask is None or ctx.right_padded else ctx.mask
        if cache is None and keep is None:
            a = F.scaled_dot_product_attention(q.unsqueeze(1), k, v, is_causal=True)
        else:
            i = torch.arange(L - n, L, device=x.device)[:, None]
            j = torch.arange(L, device=x.device)[None, :]
            allowed = (j <= i).expand(x.shape[0], n, L)
            if keep is not None and keep.shape[1] == L:
                allowed = (allowed & keep[:, None, :]) | (j == i)
            a = F.scaled_dot_product_attention(q.unsqueeze(1), k, v, attn_mask=allowed.unsqueeze(1))
        return self.o(torch.addcmul(q, a.squeeze(1), self.alpha))
