"""The interface of position schemes applied inside attention (rope, alibi): `attach()` returns one of these."""
from __future__ import annotations

import torch
from torch import nn


class InAttentionPosition(nn.Module):
    """rotate(q, k, offset) acts on q, k [b, h, n, dh] at positions offset..offset+n-1 (decoding: the new
    positions); bias(i, j) returns an additive score bias [h, *broadcast(i, j)] for query positions i and key
    positions j (integer tensors), or None."""

    def rotate(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0):
        return q, k

    def bind(self, ctx) -> None:
        """Called with the forward's Ctx before rotate/bias: a scheme whose state lives upstream (T5's shared
        table) takes it from there."""

    def bias(self, i: torch.Tensor, j: torch.Tensor):
        return None

    def dense(self, n: int, device):
        """bias(i, j) for every query i and key j in 0..n-1, [h, n, n] (or None)."""
        idx = torch.arange(n, device=device)
        return self.bias(idx[:, None], idx[None, :])


class InAttentionStream(nn.Module):
    """On the stream, a position scheme applied inside attention is the identity: the attention layers
    downstream rotate q and k (rope) or add the bias (alibi)."""

    def __init__(self, params=None, env=None):
        super().__init__()

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        return x
