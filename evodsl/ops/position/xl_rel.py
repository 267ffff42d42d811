"""pos(xl_rel): Transformer-XL's relative positions (Dai et al. 2019, §3.3), applied inside every attention layer
downstream; on the stream it is the identity. The score of query i for key j is

    A_ij = q_i·k_j + q_i·W_R R_{i-j} + u·k_j + v·W_R R_{i-j},

R_t the sinusoid of distance t (XL's layout: the sines of every frequency, then the cosines, frequencies
base^(-2k/D), D = heads·head_dim), W_R a learned [D, D] projection, u and v learned per head (untied: each
attention layer has its own, as HF's untie_r). i - j counts from the query's own position, through the current
segment and into a memory(xl) of earlier ones, so positions stay coherent across segments; with no memory it is
relative attention over the segment. Causal only in the paper; bidirectionally the distances run negative too.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost, Symbols
from ..registry import Op, OpParams, register, sequence_shape
from ._inattention import InAttentionPosition, InAttentionStream


class XLRelativeParams(OpParams):
    base: float = Field(10000.0, gt=1.0, description="R_t's frequencies are base^(-2k/D)")


def xl_sinusoid(distances: torch.Tensor, width: int, base: float, dtype) -> torch.Tensor:
    """R [len(distances), width]: sin(t·f_k) for every frequency f_k = base^(-2k/width), then cos(t·f_k)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    freq = base ** (-torch.arange(0, width, 2, device=distances.device, dtype=work) / width)
    angle = distances.to(work)[:, None] * freq[None, :]
    return torch.cat((angle.sin(), angle.cos()), dim=-1)[:, :width].to(dtype)


class XLRelative(InAttentionPosition):
    """scores(q, k): the position and bias terms of A for the queries of the segment (the last n positions)
    against every key (memory first): [b, h, n, L], before the attention's scale."""

    relative = True  # the attention computes its scores with `scores` (its XL path)

    def __init__(self, p: XLRelativeParams, heads: int, head_dim: int):
        super().__init__()
        self.base, self.heads, self.head_dim = p.base, heads, head_dim
        width = heads * head_dim
        self.r_proj = nn.Linear(width, width, bias=False)  # W_R
        self.u = nn.Parameter(torch.empty(heads, head_dim).normal_(0.0, 0.02))
        self.v = nn.Parameter(torch.empty(heads, head_dim).normal_(0.0, 0.02))

    def scores(self, q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
        """q [b, h, n, dh], k [b, h, L, dh] (K/V heads expanded): u·k_j + (q_i + v)·W_R R_{i-j}, query i sitting
        at position L - n + i of the keys. (q_i + v)·W_R R_t is computed once per distance t, for t from L - 1
        down to -1 (causal; -n bidirectionally), and each row is shifted into place by a strided view (XL's
        _rel_shift, with no copy)."""
        b, h, n, dh = q.shape
        L = k.shape[2]
        last = -1 if causal else -n  # the most negative distance computed (causal: one, masked anyway)
        distances = torch.arange(L - 1, last - 1, -1, device=q.device)
        W = distances.shape[0]
        r = self.r_proj(xl_sinusoid(distances, h * dh, self.base, q.dtype)).view(W, h, dh).permute(1, 2, 0)
        bd = (q + self.v[:, None, :]) @ r  # [b, h, n, W]: column c is distance L - 1 - c
        # row i, column j must read column n - 1 - i + j: the flat [n * W] row-major layout read from offset
        # n - 1 with rows of W - 1 gives exactly that
        bd = bd.flatten(-2)[..., n - 1: n - 1 + n * (W - 1)].view(b, h, n, W - 1)[..., :L]
        uk = k @ self.u[:, :, None]  # [b, h, L, 1]
        return bd + uk.transpose(-1, -2)


def attach_cost(p: XLRelativeParams, s: Symbols, h, kv, dh, keys=None, causal=True) -> Cost:
    """Over L keys (n, or n + M with a memory): W_R on W = L + 1 distances (L + n bidirectionally; backward: its
    weight's gradient only), (q + v) against them, u against the keys; W_R and u, v are its parameters. Its
    bytes are the XL path's to count (attention/_xl.py)."""
    L = s.n if keys is None else keys
    W = L + 1 if causal else L + s.n
    D = h * dh
    return Cost(params=D * D + 2 * D, fwd=2 * W * D * D + 2 * s.b * h * s.n * dh * W + 2 * s.b * h * L * dh,
                bwd=2 * W * D * D + 4 * s.b * h * s.n * dh * W + 4 * s.b * h * L * dh,
                fwd_other=s.b * h * s.n * dh + s.b * h * s.n * L, bwd_other=2 * (s.b * h * s.n * dh + s.b * h * s.n * L))


OP = register(Op(
    decode="the relative scores of the new queries against every key so far",
    shape=sequence_shape, family="pos", variant="xl_rel", params=XLRelativeParams, module=InAttentionStream,
    causal="yes", attach=XLRelative, attach_cost=attach_cost,
    cost=lambda p, env, s: Cost(inplace=True),  # the identity on the stream: free
    paper="Transformer-XL: Attentive Language Models Beyond a Fixed-Length Context, Dai et al. 2019, "
          "arXiv:1901.02860",
    summary="A_ij = q_i·k_j + q_i·W_R R_{i-j} + u·k_j + v·W_R R_{i-j}, R sinusoids of the distance",
    note="Pe/009.md",
))
