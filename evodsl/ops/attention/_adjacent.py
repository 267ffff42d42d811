"""Chunks that read their neighbours, as HF's Reformer lays attention out (EfficientAttentionMixin._look_adjacent):
the shared kernel of mha(chunk, before=, after=) (HF's LocalSelfAttention) and mha(lsh, form=hf) (LSHSelfAttention).

A sequence of slots (positions, or LSH's sorted order) is cut into C chunks of m; chunk c's keys are the slots of
chunks c - before .. c + after, in that order, taken modulo C when `wrap` (HF: the chunk before the first is the
last; a chunk may then appear twice, and is then counted twice in the softmax, as in HF), else those outside
0 .. C-1 left out. Per query slot i and key slot j, as HF: scores q_i . k_j; a key of a padded slot, or (causal)
of a later position, gets -1e9 (HF's mask value, not -inf); then (LSH) a key at the query's own position gets
-1e5 in place of its score (HF's self-mask value); softmax; out = sum w v, and the logsumexp of the scores.
O(C m (1 + before + after) m) scores: no n x n tensor beyond one chunk's neighbourhood.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MASK_VALUE = -1e9  # HF's mask_value_float32 (float16: -1e4)
SELF_VALUE = -1e5  # HF's self_mask_value_float32 (float16: -1e3)


def neighbours(t: torch.Tensor, before: int, after: int, wrap: bool) -> torch.Tensor:
    """t [B, C, m, ...] -> [B, C, (1 + before + after) m, ...]: each chunk's neighbours' slots, in order."""
    parts = []
    for i in range(-before, after + 1):
        if i == 0:
            parts.append(t)
        elif wrap:
            parts.append(torch.cat([t[:, i:], t[:, :i]], dim=1))  # chunk c gets chunk (c + i) mod C
        else:  # shifted in, the chunks past either end replaced by a copy that the caller's `valid` masks out
            parts.append(torch.roll(t, shifts=-i, dims=1))
    return torch.cat(parts, dim=2)


def attend_adjacent(q, k, v, qpos, kpos, valid, before: int, after: int, wrap: bool, causal: bool,
                    self_mask: bool, dropout: float = 0.0):
    """q, k, v [B, C, m, dh]; qpos, kpos [B, C, m] the positions in the slots; valid [B, C, m] a real key.
    Returns out [B, C, m, dh] and logsumexp [B, C, m]."""
    C = q.shape[1]
    kk, vv = neighbours(k, before, after, wrap), neighbours(v, before, after, wrap)
    kp, ok = neighbours(kpos, before, after, wrap), neighbours(valid, before, after, wrap)
    if not wrap:  # chunks past either end: not keys
        chunk = torch.arange(C, device=q.device)
        src = torch.cat([(chunk + i).view(C, 1).expand(C, q.shape[2]) for i in range(-before, after + 1)], dim=1)
        ok = ok & ((src >= 0) & (src < C))
    s = q @ kk.transpose(-1, -2)  # [B, C, m, K]
    ok = ok[:, :, None, :]
    if causal:
        ok = ok & (qpos[..., :, None] >= kp[:, :, None, :])
    big, own = (MASK_VALUE, SELF_VALUE) if s.dtype != torch.float16 else (-1e4, -1e3)
    s = torch.where(ok, s, torch.full((), big, dtype=s.dtype, device=s.device))
    if self_mask:
        s = torch.where(qpos[..., :, None] == kp[:, :, None, :], torch.full((), own, dtype=s.dtype, device=s.device), s)
    # softmax and logsumexp written out (as mha(lsh): onnxruntime's ReduceLogSumExp loses such rows); the weights
    # normalised after the maximum is taken out: exp(s - lse) would round lse = -1e5 + log 2 in float32
    top = s.detach().amax(-1, keepdim=True)
    e = (s - top).exp()
    total = e.sum(-1, keepdim=True)
    w, lse = e / total, top + total.log()
    if dropout:
        w = torch.nn.functional.dropout(w, dropout)
    return w @ vv, lse.squeeze(-1)


def padded_length(n, m: int):
    """n rounded up to a multiple of m (HF pads its input so; here each op pads its own, its slots masked)."""
    return (n + m - 1) // m * m


def local_adjacent(q, k, v, key_mask, c: int, before: int, after: int, wrap: bool, causal: bool, dropout: float):
    """HF's LocalSelfAttention: q [b, h, n, dh], k, v [b, h, n, dh] (keys scaled by dh^-1/2 here), chunks of c
    positions (n padded to a multiple, the padded keys masked) reading their neighbours -> [b, h, n, dh]."""
    b, h, n, dh = q.shape
    N = padded_length(n, c)
    pad = N - n
    pos = torch.arange(N, device=q.device)
    valid = (pos < n).expand(b, N)
    if key_mask is not None:
        valid = valid & F.pad(key_mask, (0, pad), value=False)

    def chunks(t):
        return F.pad(t, (0, 0, 0, pad)).reshape(b * h, N // c, c, dh)

    qpos = pos.view(1, N // c, c).expand(b * h, N // c, c)
    ok = valid[:, None].expand(b, h, N).reshape(b * h, N // c, c)
    out, _ = attend_adjacent(chunks(q), chunks(k * dh ** -0.5), chunks(v), qpos, qpos, ok, before, after, wrap,
                             causal, False, dropout)
    return out.view(b, h, N, dh)[:, :, :n]
