"""What the Gaussian-kernel Nyström attentions share (mha(skyformer), mha(soft)): the kernel and the landmark
segments.

    kappa(x, y) = exp(-||x - y||^2 / (2 sqrt(dh))) = exp(x.y / sqrt(dh) - ||x||^2 / (2 sqrt(dh)) - ||y||^2 / (2 sqrt(dh)))

(the standard Gaussian kernel of x / dh^(1/4) and y / dh^(1/4): Skyformer's eq. 3, SOFT's eq. 4), computed from
the one matmul x y^T and the two squared norms, in place: [.., a, c] for a rows against c, never more.

Segments (as mha(nystrom)): the m segments of a sequence's L tokens, token of rank r in segment floor(r m' / L)
with m' = min(m, L) segments used; a sequence of at most m tokens has one token per segment, in order, and the
segments j >= L are empty (`valid` false).
"""
from __future__ import annotations

import math

import torch


def gaussian_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """kappa(x_i, y_j) for x [..., a, dh], y [..., c, dh] (batch dimensions broadcast): [..., a, c]."""
    c = 0.5 / math.sqrt(x.shape[-1])
    s = (x @ y.transpose(-1, -2)).mul_(2 * c)
    s.sub_(x.square().sum(-1, keepdim=True).mul_(c)).sub_(y.square().sum(-1).mul_(c)[..., None, :])
    return s.exp_()


def segment_ranks(mask: torch.Tensor | None, n, m: int, device):
    """keep [b or 1, n] (the tokens), length [.., 1] (tokens per sequence), used [.., 1] (segments: min(m, L), at
    least 1), first [.., m] (rank of the first token of segment j), valid [.., m] (j < used)."""
    keep = torch.ones(1, n, dtype=torch.bool, device=device) if mask is None else mask
    length = keep.sum(-1, keepdim=True)
    used = length.clamp(min=1, max=m)
    j = torch.arange(m, device=device)
    first = (j * length + used - 1) // used  # ceil(j L / m'): the first rank r with floor(r m' / L) = j
    return keep, length, used, first, j < used


def first_positions(keep: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Position of the token of rank first[.., j] (clamped to the last position): the number of positions whose
    count of tokens up to and including them is at most that rank. [b, m]."""
    count = keep.long().cumsum(-1)  # [b, n]
    return (count[:, None, :] <= first[..., None]).sum(-1).clamp(max=keep.shape[-1] - 1)
