"""pos(xpos, gamma=0.4, scale_base=512): the extrapolatable position embedding xPos (Sun et al. 2022, "A
Length-Extrapolatable Transformer", arXiv:2212.10554, §3.2), applied to q and k inside every attention layer
downstream; on the stream it is the identity.

RoPE with a per-pair decay: for the r/2 rotated pairs (θ_i = base^(-2i/r) as pos(rope)),
ζ_i = (2i/r + γ) / (1 + γ), and the query at position m is turned and scaled by ζ_i^(m/B), the key at n by
ζ_i^(−n/B) (B = scale_base), both channels of pair i alike. Then
q_m·k_n = Σ_i ζ_i^((m−n)/B) (rope's pair score at m − n): relative, and for m > n it decays with the distance
(ζ_i < 1), the slowest-turning pairs (ζ near 1) the least. Choices where the paper is silent or its code differs:
- The positions' origin is 0 (the query scale ζ^(m/B) shrinks, the key scale grows with the position). The
  authors' torchscale centres the positions on the sequence (the same scores: the centre cancels in q·k) to halve
  the range; a fixed origin lets decoding cache turned keys, whose scale must not depend on later tokens. In
  float32, ζ_0^(−n/B) overflows past n·ln(1/ζ_0)/B ≈ 88: with γ = 0.4 and B = 512, about n = 36k.
- Bidirectional attention gets the same form (as torchscale's encoder): keys after the query are then weighted up,
  ζ^((m−n)/B) > 1; the decay the paper claims is the causal one.
- fraction < 1 (partial rotary): the passed channels are neither turned nor scaled. pairs= as pos(rope).
- Only the attentions that take q·k into a softmax (or their own score function) list it in `supports`: the
  kernelized ones (linear, performer, ...) apply a feature map after the turn, where the scales do not cancel.
Decoding: the new queries and keys at positions offset.. (cached keys keep their scale, which is the forward's).
"""
from __future__ import annotations

from typing import Literal

import sympy as sp
import torch
from pydantic import Field

from ..cost import Cost, Symbols
from ..registry import Op, OpParams, register, sequence_shape
from ._inattention import InAttentionStream
from .rope import Rotary, RotaryParams, _FUSED, rotary_attach_cost


class XPosParams(OpParams):
    base: float = Field(10000.0, gt=1.0, description="θ_i = base^(-2i/r), as pos(rope)")
    gamma: float = Field(0.4, gt=0.0, le=1e3, description="ζ_i = (2i/r + gamma) / (1 + gamma)")
    scale_base: float = Field(512.0, gt=0.0, le=1e9, description="B: q at m is scaled by ζ^(m/B), k at n by ζ^(-n/B)")
    fraction: float = Field(1.0, gt=0.0, le=1.0, description="share of each head's channels that is turned")
    pairs: Literal["interleaved", "halves"] = Field("interleaved", description="which channels turn together")


class XPos(Rotary):
    """rotate(q, k, offset): pos(rope)'s turn with ζ^(t/B) folded into q's cos and sin and ζ^(−t/B) into k's."""

    def __init__(self, p: XPosParams, heads: int, head_dim: int):
        super().__init__(RotaryParams(base=p.base, fraction=p.fraction, pairs=p.pairs), heads, head_dim)
        self.gamma, self.scale_base = p.gamma, p.scale_base

    def decay(self, n: int, device, dtype, offset: int = 0) -> torch.Tensor:
        """ζ_i^(t/B) [n, r/2] for t = offset..offset+n-1 (computed in at least float32)."""
        zeta = (torch.arange(0, self.rot, 2, device=device, dtype=dtype) / self.rot + self.gamma) / (1 + self.gamma)
        t = torch.arange(offset, offset + n, device=device, dtype=dtype)
        return (t[:, None] / self.scale_base * zeta.log()[None, :]).exp()

    def rotate(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0):
        n = q.shape[-2]
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        cos, sin = self.angles(n, q.device, work, offset)
        up = self.decay(n, q.device, work, offset)
        qc, qs, kc, ks = ((c * f).to(q.dtype) for c, f in ((cos, up), (sin, up), (cos, 1 / up), (sin, 1 / up)))
        if _FUSED[0] and q.dim() == 4:
            return self._fused(q, qc, qs), self._fused(k, kc, ks)
        return self._turn(q, qc, qs), self._turn(k, kc, ks)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma:g}, scale_base={self.scale_base:g}"


def xpos_attach_cost(p: XPosParams, s: Symbols, heads, kv_heads, head_dim) -> Cost:
    """pos(rope)'s turn (the same channels, FLOPs and live tensors), plus the scales: ζ^(t/B) (a product and an
    exp per [n, r/2] entry), its reciprocal and the four scaled tables cos·ζ^(t/B), sin·ζ^(t/B), cos·ζ^(−t/B),
    sin·ζ^(−t/B), 7 n r/2 FLOPs; the four tables [n, r/2] are what backward keeps (rope's cos and sin twice),
    and beside the turn's live tensors the decay and its reciprocal are alive."""
    rope = rotary_attach_cost(RotaryParams(base=p.base, fraction=p.fraction, pairs=p.pairs), s, heads, kv_heads,
                              head_dim)
    half = s.n * head_dim * sp.Rational(str(p.fraction)) / 2  # n·r/2
    return rope + Cost(fwd_other=7 * half, saved=2 * half * s.bytes, peak=4 * half * s.bytes)


OP = register(Op(
    decode="q, k turned and scaled at the positions after those seen (offset)",
    shape=sequence_shape, family="pos", variant="xpos", params=XPosParams, module=InAttentionStream, causal="yes",
    attach=XPos, attach_cost=xpos_attach_cost,
    cost=lambda p, env, s: Cost(inplace=True),  # the identity on the stream: free
    paper="A Length-Extrapolatable Transformer, Sun et al. 2022, arXiv:2212.10554",
    summary="rope with q_m scaled by ζ_i^(m/B), k_n by ζ_i^(−n/B), ζ_i = (2i/r + γ)/(1 + γ): q_m·k_n decays "
            "with m − n",
))
