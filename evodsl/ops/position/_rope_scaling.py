"""pos(rope)'s frequency scaling for longer contexts: θ_i = base^(-2i/r) for the r/2 pairs, replaced before the
angles. Every form reads `factor` s and (but linear and ntk) `original_max_len` L, the context trained before.
- linear (position interpolation, arXiv:2306.15595): θ_i / s.
- llama3 (Llama 3.1): wavelengths λ_i = 2π/θ_i above L / low_freq_factor take θ_i / s, below L /
  high_freq_factor keep θ_i; between, (1 − w) θ_i / s + w θ_i with w = (L/λ_i − low) / (high − low).
- ntk (NTK-aware, bloc97 2023; YaRN §3.1): the base grows instead, base' = base · s^(r/(r−2)), so the slowest pair
  turns s times slower and the fastest as before.
- dynamic_ntk (HF's "dynamic"): base' = base · (s·ℓ/L − (s − 1))^(r/(r−2)) with ℓ = max(current length, L): the
  trained frequencies up to L, then a base that grows with the length. The current length is offset + n of the
  call (decoding: the positions seen so far plus the new ones). Decoding follows HF's cache: a step's q and new k
  turn with the base of its length, the keys already cached keep the turn they got. So a decoded sequence equals
  the forward while it is no longer than L, and past L it equals what HF's generate computes. A padded batch
  counts its padded length (HF: its longest row's), which differs only past L.
- yarn (YaRN, arXiv:2309.00071, §3.2-3.4): NTK-by-parts. A pair's rotations over the trained context,
  ρ_i = L / λ_i, decide: ρ_i > beta_fast keep θ_i (extrapolate), ρ_i < beta_slow take θ_i / s (interpolate),
  between they blend, (1 − γ_i) θ_i / s + γ_i θ_i. The paper writes γ as a ramp in ρ; its code (and HF) ramp
  linearly in the pair index i between the indices where ρ = beta_fast and ρ = beta_slow,
  i = r·ln(L / (2π β)) / (2 ln base), floored and ceiled (truncate=true, the default) and clipped to [0, r − 1];
  this is that form, so that checkpoints trained with it load. The attention temperature,
  sqrt(1/t) = 0.1 ln s + 1 (1 for s <= 1; or attention_factor= when given), multiplies cos and sin, as HF does:
  q·k of the rotated channels is scaled by 1/t (fraction < 1: the passed channels are not scaled, as in HF).
"""
from __future__ import annotations

import math

import torch


def attention_factor(p) -> float:
    """YaRN's sqrt(1/t), the factor on cos and sin (1 for the other scalings)."""
    if p.scaling != "yarn":
        return 1.0
    if p.attention_factor is not None:
        return p.attention_factor
    return 0.1 * math.log(p.factor) + 1.0 if p.factor > 1 else 1.0


def yarn_ramp(p, rot: int) -> tuple[float, float]:
    """The pair indices (low, high) between which YaRN's blend ramps: where ρ_i = beta_fast and beta_slow."""
    def index(rotations):
        return rot * math.log(p.original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(p.base))
    low, high = index(p.beta_fast), index(p.beta_slow)
    if p.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot - 1)
    return low, (high + 0.001 if high == low else high)  # HF's guard against an empty ramp


def frequencies(p, rot: int, dtype=torch.float64, device=None, length=None) -> torch.Tensor:
    """θ_i [r/2] after the scaling, in `dtype`. length (dynamic_ntk): the current length, an int or a 0-d or
    [1] tensor (a symbolic length exports)."""
    exponent = torch.arange(0, rot, 2, device=device, dtype=dtype) / rot
    if p.scaling == "ntk":
        return (p.base * p.factor ** (rot / (rot - 2))) ** -exponent
    if p.scaling == "dynamic_ntk":
        if length is None:
            length = p.original_max_len
        ell = torch.as_tensor(length, dtype=dtype, device=device).reshape(-1)[:1].clamp(min=p.original_max_len)
        grow = p.factor * ell / p.original_max_len - (p.factor - 1)
        log_base = math.log(p.base) + rot / (rot - 2) * grow.log()  # [1]
        return (-exponent * log_base).exp()
    theta = p.base ** -exponent
    if p.scaling == "linear":
        return theta / p.factor
    if p.scaling == "llama3":
        wavelen = 2 * math.pi / theta
        low, high = p.original_max_len / p.low_freq_factor, p.original_max_len / p.high_freq_factor
        s = (p.original_max_len / wavelen - p.low_freq_factor) / (p.high_freq_factor - p.low_freq_factor)
        blended = (1 - s) * theta / p.factor + s * theta
        return torch.where(wavelen > low, theta / p.factor, torch.where(wavelen < high, theta, blended))
    if p.scaling == "yarn":
        low, high = yarn_ramp(p, rot)
        ramp = ((torch.arange(rot // 2, device=device, dtype=dtype) - low) / (high - low)).clamp(0, 1)
        return theta / p.factor * ramp + theta * (1 - ramp)  # ramp 0: kept (fast pairs), 1: interpolated
    return theta
