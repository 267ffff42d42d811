"""Attention through a feature map, given the features: what mha(performer) and mha(rfa) share.

Per head, with phi(q_i), phi(k_j) in R^F (F features) and v_j in R^e:

    bidirectional:  num_i = phi(q_i)^T S,    den_i = phi(q_i)^T z,      S = sum_j phi(k_j) v_j^T,  z = sum_j phi(k_j)
    causal:         the same with S_i, z_i summed over j <= i

computed together as phi(q_i)^T [S z] with [S z] = sum_j phi(k_j) [v_j 1]^T (v with a column of ones); the
caller divides num by den (each op guards the denominator its own way). `gated` is the decayed recurrence of
mha(rfa, gate=true). The causal form is linear.py's
chunked scheme (mha(linear)): within a chunk of C tokens the masked C x C products phi(Q) phi(K)^T; across
chunks the [F x e] and [F] states of all earlier chunks, an exclusive cumulative sum over chunks. O(n C F +
(n / C) F e), never n x n. `prefix_sums` is the same for a symbolic n (export); `step` the decoding form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import sympy as sp
import torch
import torch.nn.functional as F

from ..cost import Cost


def ones_column(v):
    """[..., e] -> [..., e + 1], a column of ones after v's: one matmul with it gives the numerator's sums
    phi(q)^T sum_j phi(k_j) v_j^T and, in the last column, the denominator's phi(q)^T sum_j phi(k_j)."""
    return F.pad(v, (0, 1), value=1.0)


def bidirectional(fq, fk, v, expand):
    """fq [b, h, n, F]; fk [b, kv, n, F], v [b, kv, n, e] at the K/V heads; `expand` repeats K/V heads to the
    query heads. The sums [S z] (one [F x (e + 1)] matrix) are made once per K/V head. Returns [num den]."""
    return fq @ expand(fk.transpose(-1, -2) @ ones_column(v))


def chunked(t, c: int, pad: int):
    """[b, h, n, f] -> [b, h, n / c, c, f], padded after the tokens (padded tokens reach only padded outputs): one
    contiguous copy at most, which the chunked matmuls read as views."""
    b, h, n, f = t.shape
    return (F.pad(t, (0, 0, 0, pad)) if pad else t.contiguous()).view(b, h, (n + pad) // c, c, f)


def causal(fq, fk, v, chunk: int):
    """fq, fk [b, h, n, F], v [b, h, n, e] (K/V heads already repeated): [num den], [b, h, n, e + 1]."""
    b, h, n, _ = fq.shape
    if not isinstance(n, int) or torch.jit.is_tracing():
        return prefix_sums(fq, fk, v)
    c = min(chunk, n)
    pad = -n % c
    fq, fk = chunked(fq, c, pad), chunked(fk, c, pad)
    v = F.pad(v, (0, 1, 0, pad), value=1.0).view(b, h, -1, c, v.shape[-1] + 1)  # [v 1], padded: one copy
    future = torch.ones(c, c, dtype=torch.bool, device=fq.device).triu(1)
    a = (fq @ fk.transpose(-1, -2)).masked_fill_(future, 0.0)  # phi(q_i)^T phi(k_j), j <= i, within a chunk
    s = F.pad((fk.transpose(-1, -2) @ v).cumsum(2)[:, :, :-1], (0, 0, 0, 0, 1, 0))  # [b, h, m, F, e + 1]
    return (fq @ s).add_(a @ v).view(b, h, -1, v.shape[-1])[:, :, :n]


def prefix_sums(fq, fk, v):
    """The causal form for a symbolic n (torch.export, ONNX): running sums over positions, O(n F e) memory."""
    s = (fk.unsqueeze(-1) * ones_column(v).unsqueeze(-2)).cumsum(2)  # [b, h, n, F, e + 1]
    return (fq.unsqueeze(-2) @ s).squeeze(-2)


def step(fq, fk, v, s, expand):
    """Decoding: t new tokens (fq [b, h, t, F]; fk, v at the K/V heads) read the state s = [S z] [b, kv, F, e + 1]
    of the earlier tokens and each other causally. Returns [num den] and the state with them taken in."""
    t = fq.shape[2]
    v = ones_column(v)
    future = torch.ones(t, t, dtype=torch.bool, device=fq.device).triu(1)
    a = (fq @ expand(fk).transpose(-1, -2)).masked_fill_(future, 0.0)
    return fq @ expand(s) + a @ expand(v), s + fk.transpose(-1, -2) @ v


def gated(fq, fk, v, lg, l1, s, last: bool = False):
    """The gated recurrence over chunks: fq, fk [b, h, m, c, F], v = [v 1] [b, h, m, c, e + 1], lg = log g,
    l1 = log(1 - g) [b, h, m, c]; s = [S z] [b, h, F, e + 1] the state before the first chunk. Within a chunk,
    key j reaches query i >= j with weight (1 - g_j) prod_{j < t <= i} g_t; the state before each chunk is the
    one before the last, decayed by that chunk's gates, plus its keys. Returns [num den] and, with last=True
    (decoding), the state after the last chunk (else None: no work for it)."""
    c = fq.shape[-2]
    cum = lg.cumsum(-1)  # log prod_{t <= i} g_t within the chunk
    future = torch.ones(c, c, dtype=torch.bool, device=fq.device).triu(1)
    decay = (cum.unsqueeze(-1) - cum.unsqueeze(-2) + l1.unsqueeze(-2)).masked_fill_(future, -math.inf).exp_()
    a = (fq @ fk.transpose(-1, -2)).mul_(decay)
    m = fq.shape[2] if last else fq.shape[2] - 1  # the chunks whose state a later chunk (or the caller) reads
    own = (fk[:, :, :m] * (cum[:, :, :m, -1:] - cum[:, :, :m] + l1[:, :, :m]).exp_().unsqueeze(-1)).transpose(-1, -2)
    own = own @ v[:, :, :m]  # each chunk's keys as its end state holds them
    carry = cum[:, :, :m, -1].exp()[..., None, None]  # [b, h, m, 1, 1]
    states = [s]
    for i in range(m):
        states.append(carry[:, :, i] * states[-1] + own[:, :, i])
    # the state before the chunk reaches query i decayed by g_1 .. g_i
    o = (fq * cum.exp().unsqueeze(-1) @ torch.stack(states[:fq.shape[2]], 2)).add_(a @ v)
    return o, (states[-1] if last else None)


@dataclass
class KernelCost:
    flops: Cost  # the kernel's FLOPs
    saved: object  # bytes it keeps beyond the features: v, the sums, num, den, o_proj's copy
    phases: list  # live totals of its phases (the output included where it exists)
    bwd_phases: list


def kernel_cost(s, env, h, kv, dh, f, fq, fk, grouped: bool, chunk: int, positive: bool) -> KernelCost:
    """The cost of `bidirectional` / `causal` above on F = f features per position (fq, fk: the bytes of the
    features at the query heads and at the K/V heads, alive throughout; `grouped`: fewer K/V heads than query
    heads), and of the division and o_proj after them. The backward's phases were measured with the features'
    own backward after the kernel's: `positive`, Performer's exp (its gradient a product beside phi's); else
    RFA's sin and cos (a concatenation's slices)."""
    b, n, by = s.b, s.n, s.bytes
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    e = dh + 1  # v and its column of ones
    base = kvb + fq + fk  # v, phi(q), phi(k)
    if env.causal:
        c = sp.Min(chunk, n)
        N = sp.ceiling(n / c) * c  # n padded to whole chunks
        padded = sp.Min(1, N - n)
        fwd = 2 * b * h * N * c * (f + e) + 4 * b * h * N * f * e
        other = 3 * b * h * N * c + b * h * N / c * f * e + 2 * b * h * N * e
        fN, oN = b * h * N * f * by, b * h * N * e * by
        states = b * h * N / c * f * e * by  # [S z] before every chunk
        a = b * h * N * c * by  # the C x C blocks
        # copies: phi(q) padded; phi(k) padded or repeated to the query heads; [v 1] chunked
        fq_c, fk_c = fN * padded, fN * (1 if grouped else padded)
        repeated = b * h * n * (f + dh) * by if grouped else 0  # phi(k) and v at the query heads
        # kept: the copies, the mask and A, the states, [num den] (and den clamped), o_proj's copy
        saved = fq_c + fk_c + oN + c ** 2 + a + states + oN + b * h * n * by + q
        chunks = base + fq_c + fk_c + oN + c ** 2 + a
        phases = [base + fq_c + fN * padded + repeated,  # phi(k) chunked beside its repeated copy
                  base + fq_c + fk_c + (b * h * n * dh * by if grouped else 0) + oN,  # [v 1] made
                  chunks + 2 * states,  # the states, before their cumulative sum
                  chunks + states + 2 * oN,  # [num den]: its two terms
                  base + oN + b * h * n * by + q,  # the division
                  2 * q + out]  # o_proj
        # backward (measured phases): at the division; A's gradient beside [num den]'s; then phi(q)'s beside it;
        # then four feature-sized gradients (phi(q) through the states and through A, phi(k) likewise; one more
        # where phi(k) is its own chunked view), with o_proj's copy, [num den], the states and the mask released
        start = oN - q - b * h * n * by
        released = oN + b * h * n * by + q + states + c ** 2
        own = 0 if grouped or not positive else 1 - padded  # exp(.) chunked in place (its output is its gradient's)
        bwd = [4 * q, a + start, a + fN + start - states - c ** 2, (4 + own) * fN - own * a - released]
    else:
        fwd = 2 * b * kv * n * f * e + 2 * b * h * n * f * e
        other = b * kv * n * e + 2 * b * h * n * dh
        sums = b * h * f * e * by  # [S z] at the query heads (repeated: a copy)
        # [v 1], [S z], [num den] (and den clamped), o_proj's copy
        saved = b * kv * n * e * by + sums + b * h * n * (e + 1) * by + q
        phases = [base + b * kv * n * e * by + b * kv * f * e * by,  # [S z] made
                  base + (sums if grouped else 0) + b * kv * f * e * by + b * h * n * e * by,  # [num den]
                  base + b * h * n * (e + 1) * by + q,  # the division
                  2 * q + out]  # o_proj
        # backward: at the division; phi(q)'s and phi(k)'s gradients (the sums, num and den released); the logits'
        # of q beside phi(q)'s gradient (with grouped K/V heads)
        released = q + b * h * n * (e + 2) * by
        bwd = [4 * q, fq + 2 * fk - released - sums, 2 * fq - fk - released] if positive else \
            [4 * q, fq + sums - b * h * n * e * by]  # phi(q)'s gradient beside [S z]'s
    return KernelCost(Cost(fwd=fwd, bwd=2 * fwd, fwd_other=other, bwd_other=2 * other), saved, phases, bwd)
