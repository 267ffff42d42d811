"""Collaborative heads (Cordonnier, Loukas, Jaggi 2020, "Multi-Head Attention: Collaborate Instead of
Concatenate", arXiv:2006.16362, section 3), a modifier of mha(softmax) and mha(local) (the same scores over the
window; local.py): the heads share one query and one key
projection of width D_k (collab=D_k) and each reads them through its own mixing vector m_i in R^{D_k},

    s_i(t, r) = ( (x_t W_Q) diag(m_i) (x_r W_K)^T + x_r w_i ) / sqrt(D_k / h),    o_i = softmax_r(s_i) V_i,

V_i, W_O as in mha (kv_heads shares the value heads; there is one key). The content bias x_r w_i (w_i in R^d, one
per head, `content` [h, d]) is the paper's: what the query bias of plain mha becomes once the heads share their
keys (the key bias adds a constant per query row, which the softmax cancels: W_Q and W_K carry no bias). It is
there with bias=true, as the value and output biases are. Parameters: 2 d D_k + h D_k (+ h d) against mha's
2 d h dh: collab = p d is the paper's compression ratio p.

Choices where the paper is silent: m_i starts as the "concatenate" initialisation of the authors' code (head i
reads dims i ceil(D_k/h) .. (i+1) ceil(D_k/h) - 1: plain mha when D_k = h dh); the scale sqrt(D_k / h) is the
authors' (scale= overrides it). One SDPA call: each head's query is [q * m_i, e_i] (e_i the one-hot of head i) and
the shared key [k, x W_c], so that the content bias is part of the dot product (no [h, n, n] bias tensor); the key
is expanded (a view) to the value heads; q, k or v zero-padded to one width (SDPA's fused kernels need it, the
output's padded columns cut). Decoding caches that key per value head.
Refused with it: a position scheme inside attention (rope would need to turn the shared D_k + h columns), the
other modifiers (softcap=, sink_logit=, talking=), RealFormer's residual scores and memory(xl).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..registry import OpEnv, OpParams, ShapeProblem


class CollabParams(OpParams):
    collab: int | None = Field(None, ge=1, le=1 << 16, description="D_k: collaborative heads, one query and one key "
                                                                   "projection of width D_k shared by every head, "
                                                                   "each reading it through its own mixing vector")


class CollabHeads(nn.Module):
    """The mixing vectors m_i (`mixing` [h, D_k]) and the content bias (`content`, d -> h, or None)."""

    def __init__(self, d: int, heads: int, width: int, bias: bool):
        super().__init__()
        mixing = torch.zeros(heads, width)
        step = -(-width // heads)
        for i in range(heads):
            mixing[i, i * step:(i + 1) * step] = 1.0
        self.mixing = nn.Parameter(mixing)
        self.content = nn.Linear(d, heads, bias=False) if bias else None


def collab_setup(m, p, d: int, d_kv: int) -> None:
    """On an AttentionBase `m`: q_proj and k_proj of width D_k without bias, m.collab (None without collab=)."""
    m.collab = None
    if not getattr(p, "collab", None):
        return
    m.q_proj = nn.Linear(d, p.collab, bias=False)
    m.k_proj = nn.Linear(d_kv, p.collab, bias=False)
    m.collab = CollabHeads(d_kv, m.heads, p.collab, p.bias)


def collab_scale(m, scale: float | None) -> float | None:
    """scale= as given, else sqrt(D_k / h) with collab= (None: SDPA's default)."""
    if scale is not None or m.collab is None:
        return scale
    return 1 / math.sqrt(m.collab.mixing.shape[1] / m.heads)


def collab_width(m) -> int:
    """W, the one width collab_qkv gives q, k and v: the larger of D_k (+ h with the content bias) and dh."""
    c = m.collab
    return max(c.mixing.shape[1] + (m.heads if c.content is not None else 0), m.head_dim)


def collab_qkv(m, x: torch.Tensor, factor: float = 1.0):
    """q [b, h, n, W], the shared key expanded (a view) to [b, kv_heads, n, W], v [b, kv_heads, n, W]: W the larger
    of D_k (+ h) and dh, the narrower ones zero-padded. `factor` scales q (through m_i and e_i: no copy of q)."""
    b, n, _ = x.shape
    h, kv = m.heads, m.kv_heads
    mixing = m.collab.mixing if factor == 1.0 else m.collab.mixing * factor
    q = m.q_proj(x)[:, None] * mixing[None, :, None, :]  # [b, h, n, D_k]
    k = m.k_proj(x)
    if m.collab.content is not None:  # [q * m_i, e_i] . [k, x W_c] = q diag(m_i) k + x w_i
        e = torch.full((h,), factor, dtype=q.dtype, device=q.device).diag()[None, :, None, :].expand(b, h, n, h)
        q = torch.cat((q, e), -1)
        k = torch.cat((k, m.collab.content(x)), -1)
    v = m.v_proj(x).view(b, n, kv, m.head_dim).transpose(1, 2)
    # one width for SDPA's fused kernels (they take none other; the math kernel would keep the [n, n] weights):
    # zero columns on q and k change no dot product; on v, no output column but the cut ones (m.out cuts them)
    width = max(q.shape[-1], m.head_dim)
    if q.shape[-1] < width:
        q, k = F.pad(q, (0, width - q.shape[-1])), F.pad(k, (0, width - k.shape[-1]))
    elif m.head_dim < width:
        v = F.pad(v, (0, width - m.head_dim))
    return q, k[:, None].expand(b, kv, n, width), v


def check_collab(op_id: str, p, env: OpEnv, others: list[str]) -> None:
    """What collab= does not combine with (`others`: the other modifiers set), with the field to point at."""
    if not getattr(p, "collab", None):
        return
    if env.pos is not None:
        raise ShapeProblem(f"{op_id} with collab={p.collab} takes no position scheme inside attention, not "
                           f"pos({env.pos[0].variant})", "collab",
                           "use a position scheme added to the stream (pos(sinusoidal), pos(learned))")
    if others:
        raise ShapeProblem(f"{op_id} with collab={p.collab} takes none of the other modifiers ({', '.join(others)})",
                           "collab", "drop collab= or the other modifier")
    if env.residual_scores or env.memory is not None:
        raise ShapeProblem(f"{op_id} with collab={p.collab} runs no RealFormer residual scores and keeps no "
                           "memory(xl)", "collab", "drop collab=, or the residual(..., scores=true) / memory(xl)")
