"""Chunks that read their neighbours, as HF's Reformer lays attention out (EfficientAttentionMixin._look_adjacent):
the shared kernel of mha(chunk, before=, after=, wrap=) (HF's LocalSelfAttention) and mha(lsh, form=hf)
(LSHSelfAttention).

A row of slots (positions, or LSH's sorted order, round after round) is cut into chunks of m; chunk u's keys are
the slots of chunks u - before .. u + after of the row's real chunks, taken modulo their number when `wrap` (HF:
the chunk before the first is the last; a chunk may then appear twice, and is counted twice in the softmax, as in
HF), else those outside left out. Per query slot i and key slot j, as HF: scores q_i . k_j; a key of a padded
slot, or (causal) of a later position, gets -1e9 (HF's mask value, not -inf); then (LSH) a key at the query's own
position gets -1e5 in place of its score (HF's self-mask value); softmax; out = sum w v, and the logsumexp.
The rows are padded to whole chunks and one more (never a single chunk: torch.export would specialise it), by
gathers rather than pads or slices of a symbolic size; a row reads its own real chunks only, so a padded batch
gives each row what it gives alone. O(n J m d) for J = 1 + before + after neighbours: no n x n tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MASK_VALUE = -1e9  # HF's mask_value_float32 (float16: -1e4)
SELF_VALUE = -1e5  # HF's self_mask_value_float32 (float16: -1e3)


def mod(a, k):
    """a mod k (floor), written out: the ONNX exporter has no aten.remainder.Scalar."""
    return a - torch.div(a, k, rounding_mode="floor") * k


def neighbours(counts, rounds: int, chunks: int, before: int, after: int, wrap: bool):
    """Each chunk's neighbours, as physical chunk indices [B, C, J] (J = 1 + before + after) and whether each is
    one ([B, C, J]). A row's layout holds `rounds` runs of chunks / rounds physical chunks, of which the first
    counts[row] are its real ones (the rest padding, never read): the real chunks, run after run, are its
    logical sequence, and chunk u's neighbours are u - before .. u + after in it, modulo its length (wrap) or
    inside it. So a padded row reads what the row alone would (HF's layout of the row alone)."""
    per = chunks // rounds
    p = torch.arange(chunks, device=counts.device)
    cnt = counts[:, None]  # [B, 1]
    logical = (p // per)[None] * cnt + mod(p, per)[None]  # [B, C]
    total = cnt * rounds
    idx, ok = [], []
    for i in range(-before, after + 1):
        lam = logical + i
        inside = (lam >= 0) & (lam < total)
        lam = mod(lam, total) if wrap else lam.clamp(min=0)
        lam = torch.minimum(lam, total - 1)
        idx.append((lam // cnt) * per + mod(lam, cnt))
        ok.append(inside | wrap)
    return torch.stack(idx, -1), torch.stack(ok, -1)


def attend_adjacent(q, k, v, qpos, kpos, valid, before: int, after: int, wrap: bool, causal: bool,
                    self_mask: bool, counts, rounds: int = 1, dropout: float = 0.0):
    """q, k, v [B, C, m, dh]; qpos, kpos [B, C, m] the positions in the slots; valid [B, C, m] a real key;
    counts [B] each row's real chunks per run (neighbours()). Returns out [B, C, m, dh] and logsumexp [B, C, m]."""
    B, C, m, dh = q.shape
    idx, inside = neighbours(counts, rounds, C, before, after, wrap)  # [B, C, J]
    flat = (idx + torch.arange(B, device=q.device).view(B, 1, 1) * C).flatten(1)  # [B, C J] rows of [B C, m, .]

    def gather(t):
        g = t.reshape(B * C, m, *t.shape[3:])[flat]  # [B, C J, m, ...]
        return g.reshape(B, C, -1, *t.shape[3:])  # [B, C, J m, ...]

    kk, vv, kp = gather(k), gather(v), gather(kpos)
    ok = gather(valid) & inside[..., None].expand(B, C, idx.shape[-1], m).reshape(B, C, -1)
    s = q @ kk.transpose(-1, -2)  # [B, C, m, J m]
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
        w = F.dropout(w, dropout)
    return w @ vv, lse.squeeze(-1)


def padded_length(n, m: int):
    """n rounded up to a multiple of m, plus one chunk of padding: at least two chunks, never one (a size torch.export
    would specialise), and the padding never read (neighbours() reads a row's real chunks only)."""
    return (n + 2 * m - 1) // m * m


def real_counts(valid, m: int):
    """valid [b, N] -> each row's real chunks, ceil(L / m) (at least 1), L its real tokens."""
    return ((valid.sum(-1) + m - 1) // m).clamp(min=1)


def local_adjacent(q, k, v, key_mask, c: int, before: int, after: int, wrap: bool, causal: bool, dropout: float):
    """HF's LocalSelfAttention: q [b, h, n, dh], k, v [b, h, n, dh] (keys scaled by dh^-1/2 here), chunks of c
    positions (right-padded rows: a row's own chunks, as alone) reading their neighbours -> [b, h, n, dh]."""
    b, h, n, dh = q.shape
    N = padded_length(n, c)
    pos = torch.arange(N, device=q.device)
    src = pos.clamp(max=n - 1)  # padded slots copy the last token (masked): no pad of a symbolic amount
    valid = (pos < n).expand(b, N)
    if key_mask is not None:
        valid = valid & key_mask[:, src]

    def chunks(t):
        return t[:, :, src].reshape(b * h, N // c, c, dh)

    qpos = pos.view(1, N // c, c).expand(b * h, N // c, c)
    ok = valid[:, None].expand(b, h, N).reshape(b * h, N // c, c)
    counts = real_counts(valid, c)[:, None].expand(b, h).reshape(b * h)
    out, _ = attend_adjacent(chunks(q), chunks(k * dh ** -0.5), chunks(v), qpos, qpos, ok, before, after, wrap,
                             causal, False, counts, 1, dropout)
    return out.view(b, h, N, dh)[:, :, torch.arange(n, device=q.device)]  # indexed, not sliced: n <= N is not for torch.export to prove
