"""pos(rope, base=10000, fraction=1, pairs=interleaved, scaling=none): rotary position embedding (RoFormer, Su et
al. 2021), applied to q and k inside every attention layer downstream; on the stream it is the identity.

For a head of width dh, the first r = fraction·dh channels are rotated (fraction < 1 is GPT-NeoX's partial
rotary) in pairs: with θ_i = base^(-2i/r), the pair (x_a, x_b) at position t becomes
(x_a cos tθ_i − x_b sin tθ_i, x_a sin tθ_i + x_b cos tθ_i). Then q_m·k_n depends on m − n only.
- pairs=interleaved (the paper's, the default): (a, b) = (2i, 2i+1);
- pairs=halves (GPT-NeoX's and HF Llama's rotate_half): (a, b) = (i, i + r/2), so that HF checkpoints load with
  their q/k weights as they are. The two layouts are the same model up to a permutation of q's and k's rows.
Frequency scaling for context extension (θ_i replaced before the angles; the formulas and their choices in
_rope_scaling.py): scaling=linear (position interpolation, arXiv:2306.15595), llama3 (Llama 3.1), ntk (NTK-aware:
base' = base·factor^(r/(r−2))), dynamic_ntk (HF's dynamic NTK: the base recomputed from the current length past
original_max_len; decoding keeps the cached keys' turns, as HF does), yarn (arXiv:2309.00071: NTK-by-parts between
the beta_fast and beta_slow wavelengths, and cos, sin times sqrt(1/t) = 0.1 ln(factor) + 1).
Nothing depends on a maximum length: the angles are computed for the actual n on each call.
"""
from __future__ import annotations

import contextlib
from typing import Literal

import sympy as sp
import torch
from pydantic import Field, model_validator


from ..cost import Cost, Symbols
from ..registry import Op, OpParams, ShapeProblem, register, sequence_shape
from ._inattention import InAttentionPosition, InAttentionStream
from ._rope_scaling import attention_factor, frequencies


class RotaryParams(OpParams):
    base: float = Field(10000.0, gt=1.0, description="θ_i = base^(-2i/r): the slowest pair turns base times slower")
    fraction: float = Field(1.0, gt=0.0, le=1.0, description="share of each head's channels that is rotated")
    pairs: Literal["interleaved", "halves"] = Field("interleaved", description="which channels turn together: "
                                                    "(2i, 2i+1) as in the paper, or (i, i + r/2) as HF Llama")
    scaling: Literal["none", "linear", "llama3", "ntk", "dynamic_ntk", "yarn"] = Field(
        "none", description="frequency scaling for longer contexts")
    factor: float = Field(1.0, ge=1.0, le=1e6, description="scaling: how much slower the scaled frequencies turn")
    low_freq_factor: float = Field(1.0, gt=0.0, le=1e6, description="scaling=llama3: wavelengths above "
                                   "original_max_len / low_freq_factor are fully scaled")
    high_freq_factor: float = Field(4.0, gt=0.0, le=1e6, description="scaling=llama3: wavelengths below "
                                    "original_max_len / high_freq_factor are kept")
    original_max_len: int = Field(8192, ge=1, description="scaling=llama3, dynamic_ntk, yarn: the context length "
                                  "trained before")
    beta_fast: float = Field(32.0, gt=0.0, description="scaling=yarn: pairs turning more often than this over "
                             "original_max_len keep their frequency")
    beta_slow: float = Field(1.0, gt=0.0, description="scaling=yarn: pairs turning less often are interpolated")
    attention_factor: float | None = Field(None, gt=0.0, le=100.0, description="scaling=yarn: the factor on cos "
                                           "and sin (default 0.1 ln(factor) + 1)")
    truncate: bool = Field(True, description="scaling=yarn: the ramp's ends rounded to whole pairs (HF's default)")

    @model_validator(mode="after")
    def _scaling_args(self):
        if self.scaling == "none" and self.factor != 1.0:
            raise ValueError("factor= scales the frequencies only with scaling=linear, llama3, ntk, dynamic_ntk "
                             "or yarn")
        if self.scaling == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError("scaling=llama3 needs high_freq_factor > low_freq_factor")
        if self.scaling == "yarn" and not self.beta_fast > self.beta_slow:
            raise ValueError("scaling=yarn needs beta_fast > beta_slow (the fast pairs keep their frequency)")
        yarn_only = [k for k in ("beta_fast", "beta_slow", "attention_factor", "truncate")
                     if k in self.model_fields_set]
        if yarn_only and self.scaling != "yarn":
            raise ValueError(f"{', '.join(yarn_only)} only apply with scaling=yarn")
        return self


_FUSED = [False]  # set while exporting at opset 23 and later: the rotation as ONNX's RotaryEmbedding op


@contextlib.contextmanager
def fused_rotary(on: bool = True):
    """While active, rotate() goes through torch.onnx.ops.rotary_embedding, which computes the same in eager and
    exports as one RotaryEmbedding node (opset 23)."""
    before, _FUSED[0] = _FUSED[0], on
    try:
        yield
    finally:
        _FUSED[0] = before


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
        self.p, self.base, self.rot, self.head_dim = p, p.base, rotary_channels(p, head_dim), head_dim
        self.halves, self.mscale = p.pairs == "halves", attention_factor(p)

    def angles(self, n: int, device, dtype, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, r/2] of t·θ_i for t = offset..offset+n-1, computed in at least float32 and returned in
        `dtype`."""
        work = torch.float64 if dtype == torch.float64 else torch.float32
        t = torch.arange(offset, offset + n, device=device, dtype=work)
        theta = frequencies(self.p, self.rot, work, device, t[-1:] + 1 if self.p.scaling == "dynamic_ntk" else None)
        angle = t[:, None] * theta[None, :]
        if self.mscale != 1.0:  # yarn's temperature
            return (angle.cos() * self.mscale).to(dtype), (angle.sin() * self.mscale).to(dtype)
        return angle.cos().to(dtype), angle.sin().to(dtype)

    def _turn(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        head, rest = x[..., : self.rot], x[..., self.rot:]
        if self.halves:
            a, b = head[..., : self.rot // 2], head[..., self.rot // 2:]
            turned = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
        else:
            even, odd = head[..., 0::2], head[..., 1::2]
            turned = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
        return turned if self.rot == self.head_dim else torch.cat((turned, rest), dim=-1)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0):
        cos, sin = self.angles(q.shape[-2], q.device, q.dtype, offset)
        if _FUSED[0] and q.dim() == 4:
            return self._fused(q, cos, sin), self._fused(k, cos, sin)
        return self._turn(q, cos, sin), self._turn(k, cos, sin)

    def _fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [b, heads, n, dh] through ONNX's RotaryEmbedding (cos, sin per batch row and position)."""
        b, n = x.shape[0], x.shape[2]
        cos, sin = cos.unsqueeze(0).expand(b, n, -1), sin.unsqueeze(0).expand(b, n, -1)
        return torch.onnx.ops.rotary_embedding(x, cos, sin, interleaved=not self.halves,
                                               rotary_embedding_dim=0 if self.rot == self.head_dim else self.rot)

    def extra_repr(self) -> str:
        extra = "" if self.p.scaling == "none" else f", scaling={self.p.scaling}, factor={self.p.factor:g}"
        return f"base={self.base:g}, rotated_channels={self.rot}, pairs={self.p.pairs}{extra}"



def rotary_attach_cost(p: RotaryParams, s: Symbols, heads, kv_heads, head_dim) -> Cost:
    """Inside attention: r = fraction*dh channels of q and k turn, 3 FLOPs per channel (4 products, a sum and
    a difference per pair), plus the angles; cos and sin [n, r/2] are kept for backward. While k turns, the
    turned q, k's pair products and its result (r + dh per head) and cos, sin are alive besides q, k, v.
    Backward, beside the gradients of q, k, v: q's turned back, the four products of its pairs, then the
    gradients of its rotated and passed channels, each a full [b, h, n, dh] (slice_backward), and their sum:
    two q's worth at the most. scaling=yarn: cos and sin times the temperature factor, n·r/2 FLOPs each (the
    frequencies of every scaling, O(r), are not counted)."""
    r = head_dim * sp.Rational(str(p.fraction))
    b, n, by = s.b, s.n, s.bytes
    other = 3 * b * n * (heads + kv_heads) * r + 3 * n * r / 2 + (n * r if p.scaling == "yarn" else 0)
    return Cost(fwd_other=other, bwd_other=2 * other, saved=n * r * by,
                peak=b * n * (heads * head_dim + kv_heads * (r + head_dim)) * by + n * r * by,
                bwd_peak=2 * b * n * heads * head_dim * by)


OP = register(Op(
    decode="q, k turned at the positions after those seen (offset)",
    shape=sequence_shape, family="pos", variant="rope", params=RotaryParams, module=InAttentionStream, causal="yes",
    attach=Rotary, attach_cost=rotary_attach_cost,
    cost=lambda p, env, s: Cost(inplace=True),  # the identity on the stream: free
    paper="RoFormer: Enhanced Transformer with Rotary Position Embedding, Su et al. 2021, arXiv:2104.09864",
    summary="rotate q, k pairs (x_2i, x_2i+1) (pairs=halves: (x_i, x_i+r/2)) at position t by t·base^(-2i/r) "
            "(scaling: linear, llama3, ntk, dynamic_ntk, yarn); q_m·k_n depends on m−n only",
    note="Arch/001.md",
))
