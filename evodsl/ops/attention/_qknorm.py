"""QKNorm (Henry, Dachapally, Pawar, Chen 2020, "Query-Key Normalization for Transformers", Findings of EMNLP,
arXiv:2010.04245): mha(softmax, qk_norm=true, qk_len=L).

Each head's query and key are l2-normalised along the head dimension, and their dot product, a cosine in [-1, 1],
is scaled by ONE learned scalar g instead of 1/sqrt(dh):

    q^_i = q_i / ||q_i||,   k^_j = k_j / ||k_j||,   A = softmax(g q^_i . k^_j) V,   g(0) = log2(L^2 - L)

L is the training length the init is read from (the paper: the 97.5th percentile of the training sequence
lengths), hence the required qk_len. It still runs on SDPA: g is folded into the normalised queries (g q^) and SDPA
gets scale=1. Choices where the paper is silent: one g per layer shared by the heads (the authors' code), the
normalisation after the position scheme's rotation (RoPE is orthogonal: it keeps the norms, so the order does not
matter), F.normalize's eps (1e-12) against a zero vector; the K/V cache keeps the normalised keys.

mha(forgetting)'s qk_norm (FoX Pro) is another normalisation under the same name: an RMSNorm of each head's q and
k with a learned gain per channel, the softmax's 1/sqrt(dh) kept (_forgetting_pro.py)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..cost import Cost
from ..registry import OpEnv, OpParams, ShapeProblem


class QKNormParams(OpParams):
    qk_norm: bool = Field(False, description="QKNorm: l2-normalised q and k per head, softmax(g q^.k^), g learned")
    qk_len: int | None = Field(None, ge=2, le=10_000_000, description="L of g(0) = log2(L^2 - L) (with qk_norm)")


def qk_gain(p) -> nn.Parameter | None:
    """g, initialised to log2(L^2 - L); None without qk_norm."""
    return nn.Parameter(torch.tensor(math.log2(p.qk_len ** 2 - p.qk_len))) if p.qk_norm else None


def qk_apply(gain: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g q^, k^): SDPA with scale=1 then computes softmax(g q^ . k^)."""
    return F.normalize(q, dim=-1) * gain.to(q.dtype), F.normalize(k, dim=-1)


def check_qk_norm(op_id: str, p, env: OpEnv, others: list) -> None:
    """qk_len goes with qk_norm; what the SDPA path with QKNorm does not run is refused."""
    if p.qk_len is not None and not p.qk_norm:
        raise ShapeProblem("qk_len is read only with qk_norm=true", "qk_len", "add qk_norm=true, or drop qk_len")
    if not p.qk_norm:
        return
    if p.qk_len is None:
        raise ShapeProblem(f"{op_id} with qk_norm=true needs qk_len=L, the training length g(0) = log2(L^2 - L) is "
                           "read from", "qk_norm", "add qk_len=L (the paper: the 97.5th percentile of the lengths)")
    if p.scale is not None:
        raise ShapeProblem(f"{op_id} with qk_norm=true learns its score scale g: scale= has no place", "scale",
                           "drop scale=")
    if others:
        raise ShapeProblem(f"{op_id} with qk_norm=true runs on SDPA, without {', '.join(others)}", "qk_norm",
                           "drop one of them")
    if env.residual_scores or env.memory is not None or (env.pos is not None
                                                          and getattr(env.pos[0].attach, "relative", False)):
        raise ShapeProblem(f"{op_id} with qk_norm=true runs no RealFormer residual scores and not "
                           "Transformer-XL's path (memory(xl), pos(xl_rel))", "qk_norm",
                           "drop qk_norm, or the residual(..., scores=true) / memory(xl) / pos(xl_rel)")


def qk_norm_cost(p, s, h, kv, dh) -> Cost:
    """One parameter, g. Per element of q and k: square, sum, divide (3 FLOPs), and g·q^ (1 per element of q);
    backward ~2x. Kept for backward beyond SDPA's own: q and k before the normalisation, and their norms and
    clamped norms [b, heads, n, 1] (F.normalize divides by the clamped norm), and q^ for g's gradient (SDPA keeps
    g q^ and k^ in place of q and k). The inference peak is a phase of mha(softmax)'s (the normalisation's), and
    the backward's peak stays the kernel's (measured: the normalisations' gradients come after it)."""
    b, n, by = s.b, s.n, s.bytes
    q, k = b * n * h * dh, b * n * kv * dh
    norms = 2 * b * n * (h + kv)  # ||x|| and its clamp, [b, heads, n, 1], for q and k
    return Cost(params=1, fwd_other=4 * q + 3 * k, bwd_other=8 * q + 6 * k, saved=(2 * q + k + norms) * by)
