"""pos(rope, base=10000, fraction=1): rotary position embedding (RoFormer, Su et al. 2021), applied to q and k
inside every attention layer downstream; on the stream it is the identity.

For a head of width dh, the first r = fraction·dh channels are rotated (fraction < 1 is GPT-NeoX's partial
rotary) in the paper's interleaved pairs: with θ_i = base^(-2i/r), the pair (x_2i, x_2i+1) at position t
becomes (x_2i cos tθ_i − x_2i+1 sin tθ_i, x_2i sin tθ_i + x_2i+1 cos tθ_i). Then q_m·k_n depends on m − n
only. Nothing depends on a maximum length: the angles are computed for the actual n on each call.
"""
from __future__ import annotations

import sympy as sp
import torch
from pydantic import Field


from ..cost import Cost, Symbols
from ..registry import Op, OpParams, ShapeProblem, register, sequence_shape
from ._inattention import InAttentionPosition, InAttentionStream


class RotaryParams(OpParams):
    base: float = Field(10000.0, gt=1.0, description="θ_i = base^(-2i/r): the slowest pair turns base times slower")
    fraction: float = Field(1.0, gt=0.0, le=1.0, description="share of each head's channels that is rotated")


def rotary_channels(p: RotaryParams, head_dim: int) -> int:
    """r = fraction·head_dim, which must be a whole, even, positive number of channels."""
    r = p.fraction * head_dim
    if abs(r - round(r)) < 1e-6 and round(r) % 2 == 0 and round(r) > 0:
        return round(r)
    near = sorted(range(2, head_dim + 1, 2), key=lambda c: abs(c - r))[:2]
    raise ShapeProblem(f"pos(rope, fraction={p.fraction:g}) rotates {r:g} of head_dim={head_dim} channels; "
                       f"channels turn in pairs, so that must be an even whole number", "fraction",
                       "try " + " or ".join(f"fraction={c / head_dim:g} ({c} channels)" for c in sorted(near))
                       if near else "rotary positions need head_dim >= 2")


class Rotary(InAttentionPosition):
    """rotate(q, k): the rotation of position t applied to q and k at t = 0..n-1 (any number of heads)."""

    def __init__(self, p: RotaryParams, heads: int, head_dim: int):
        super().__init__()
        self.base, self.rot, self.head_dim = p.base, rotary_channels(p, head_dim), head_dim

    def angles(self, n: int, device, dtype, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, r/2] of t·θ_i for t = offset..offset+n-1, computed in at least float32 and returned in
        `dtype`."""
        work = torch.float64 if dtype == torch.float64 else torch.float32
        theta = self.base ** (-torch.arange(0, self.rot, 2, device=device, dtype=work) / self.rot)
        angle = torch.arange(offset, offset + n, device=device, dtype=work)[:, None] * theta[None, :]
        return angle.cos().to(dtype), angle.sin().to(dtype)

    def _turn(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        head, rest = x[..., : self.rot], x[..., self.rot:]
        even, odd = head[..., 0::2], head[..., 1::2]
        turned = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
        return turned if self.rot == self.head_dim else torch.cat((turned, rest), dim=-1)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0):
        cos, sin = self.angles(q.shape[-2], q.device, q.dtype, offset)
        return self._turn(q, cos, sin), self._turn(k, cos, sin)

    def extra_repr(self) -> str:
        return f"base={self.base:g}, rotated_channels={self.rot}"



def rotary_attach_cost(p: RotaryParams, s: Symbols, heads, kv_heads, head_dim) -> Cost:
    """Inside attention: r = fraction*dh channels of q and k turn, 3 FLOPs per channel (4 products, a sum and
    a difference per pair), plus the angles; cos and sin [n, r/2] are kept for backward. While k turns, the
    turned q, k's pair products and its result (r + dh per head) and cos, sin are alive besides q, k, v.
    Backward, beside the gradients of q, k, v: q's turned back, the four products of its pairs, then the
    gradients of its rotated and passed channels, each a full [b, h, n, dh] (slice_backward), and their sum:
    two q's worth at the most."""
    r = head_dim * sp.Rational(str(p.fraction))
    b, n, by = s.b, s.n, s.bytes
    other = 3 * b * n * (heads + kv_heads) * r + 3 * n * r / 2
    return Cost(fwd_other=other, bwd_other=2 * other, saved=n * r * by,
                peak=b * n * (heads * head_dim + kv_heads * (r + head_dim)) * by + n * r * by,
                bwd_peak=2 * b * n * heads * head_dim * by)


OP = register(Op(
    decode="q, k turned at the positions after those seen (offset)",
    shape=sequence_shape, family="pos", variant="rope", params=RotaryParams, module=InAttentionStream, causal="yes",
    attach=Rotary, attach_cost=rotary_attach_cost,
    cost=lambda p, env, s: Cost(inplace=True),  # the identity on the stream: free
    paper="RoFormer: Enhanced Transformer with Rotary Position Embedding, Su et al. 2021, arXiv:2104.09864",
    summary="rotate q, k pairs (x_2i, x_2i+1) at position t by t·base^(-2i/r); q_m·k_n depends on m−n only",
    note="Arch/001.md",
))
