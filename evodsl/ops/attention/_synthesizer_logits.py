"""The synthetic logits of mha(synthesizer) (synthesizer.py): each kind's [.., h, rows, keys] score block, for the
query rows p0 .. T-1 against the keys 0 .. T-1, and the cut of a max_len table to T that export keeps symbolic."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("dense", "random", "factorized_dense", "factorized_random")
MIXES = {"random_vanilla": ("random", "vanilla"), "dense_vanilla": ("dense", "vanilla"),
         "random_dense": ("random", "dense"), "dense_random_vanilla": ("dense", "random", "vanilla"),
         "factorized_random_vanilla": ("factorized_random", "vanilla")}


def components(p) -> tuple:
    """The kinds whose logits are summed: the mixture's, or the one kind."""
    return MIXES[p.mix] if p.kind == "mixture" else (p.kind,)


def factors(p) -> int:
    """factorized_dense's a: given, or the largest divisor of max_len <= sqrt(max_len)."""
    return p.factors or max(a for a in range(1, math.isqrt(p.max_len) + 1) if p.max_len % a == 0)


def cut(t: torch.Tensor, dim: int, start, stop) -> torch.Tensor:
    """t[start:stop] along `dim`: a slice at a known length, an index_select when exporting (a graph for every n
    cannot slice a max_len table to a symbolic length as a view)."""
    if isinstance(stop, int) and isinstance(start, int) and not torch.compiler.is_exporting():
        return t.narrow(dim, start, stop - start)
    return t.index_select(dim, torch.arange(start, stop, device=t.device))


def _table(*shape) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) / math.sqrt(shape[-1]))


class SyntheticLogits(nn.Module):
    """The parameters of the synthetic kinds: dense F(x) = W2 relu(W1 x + b1) + b2 (W1 shared by the heads, W2 one
    [max_len, hidden] map per head); random R [h, L, L] (a buffer if not trainable); factorized dense A = W_A
    relu(W1 x + b1) [h, a], B = W_B relu(..) [h, L / a]; factorized random R1, R2 [h, L, rank]."""

    def __init__(self, kinds, d: int, heads: int, p):
        super().__init__()
        self.kinds, L = kinds, p.max_len
        if {"dense", "factorized_dense"} & set(kinds):
            self.w1 = nn.Linear(d, p.hidden or d, bias=p.bias)
        hid = p.hidden or d
        if "dense" in kinds:
            self.w2 = _table(heads, L, hid)  # head h's logit of position j: row j of w2[h]
            self.b2 = nn.Parameter(torch.zeros(heads, L)) if p.bias else None
        if "random" in kinds:
            r = torch.randn(heads, L, L)
            if p.trainable:
                self.r = nn.Parameter(r)
            else:
                self.register_buffer("r", r)
        if "factorized_dense" in kinds:
            self.a, self.bb = p.factors, L // p.factors
            self.wa = nn.Linear(hid, heads * p.factors, bias=p.bias)
            self.wb = nn.Linear(hid, heads * (L // p.factors), bias=p.bias)
        if "factorized_random" in kinds:
            self.r1, self.r2 = _table(heads, L, p.rank), _table(heads, L, p.rank)

    def hidden(self, x: torch.Tensor):
        return F.relu(self.w1(x)) if hasattr(self, "w1") else None

    def logits(self, kind: str, x, hid, p0, T) -> torch.Tensor:
        """[b | 1, h, T - p0, T]: the logits of the queries at positions p0 .. T-1 (x, hid: their tokens, [b, r, .])
        against the keys 0 .. T-1."""
        if kind == "dense":  # one [b r, hidden] x [hidden, h T] matmul (W2 cut to T rows, a copy of h T hidden)
            h = self.w2.shape[0]
            w = cut(self.w2, 1, 0, T).reshape(-1, self.w2.shape[2])
            s = F.linear(hid, w, None if self.b2 is None else cut(self.b2, 1, 0, T).reshape(-1))
            return s.unflatten(2, (h, -1)).transpose(1, 2).contiguous()  # [b, h, r, T]
        if kind == "random":
            return cut(cut(self.r, 1, p0, T), 2, 0, T).unsqueeze(0)
        if kind == "factorized_random":
            return (cut(self.r1, 1, p0, T) @ cut(self.r2, 1, 0, T).transpose(-1, -2)).unsqueeze(0)
        b, r, _ = hid.shape  # factorized dense: C_j = A_{j // (L / a)} B_{j mod (L / a)}, j < T
        A = self.wa(hid).view(b, r, -1, self.a).transpose(1, 2)  # [b, h, r, a]
        B = self.wb(hid).view(b, r, -1, self.bb).transpose(1, 2)
        j = torch.arange(T, device=hid.device)
        return A.index_select(3, j // self.bb) * B.index_select(3, j % self.bb)  # [b, h, r, T]
