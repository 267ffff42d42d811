"""mha(slim, features=m, chunk=C): SLiM Performer (Likhosherstov et al. 2020), Performer whose causal prefix sums
train in sublinear memory.

The equation is mha(performer)'s (FAVOR+ features, its draw, stabilisation, padding, rope and decoding; the
features by import): per head, with [v 1] = v and a column of ones,

    [num den]_i = phi(q_i)^T sum_{j <= i} phi(k_j) [v_j 1]^T,      out_i = num_i / den_i

The causal sums run chunk by chunk, C tokens at a time: within a chunk the masked C x C products, across chunks
the running state S = sum phi(k_j) [v_j 1]^T ([m x (dh + 1)]). Autograd keeps none of it: the forward keeps
phi(Q), phi(K), [V 1] and the final state only, and the backward walks the chunks in reverse, recovering the
state before each chunk by subtracting the chunk's own sum (the paper's reversible scheme), recomputing the
chunk's C x C products, and carrying the gradient of the state, R = sum over later chunks of phi(q)^T dO. So
beyond the features the attention keeps O(m dh) in training and builds O(C^2 + C m) at a time: no per-chunk
states, no n x C products (mha(performer) keeps both). A symbolic length (export) runs Performer's prefix sums.
Bidirectional, it is Performer (phi(K)^T V is one sum).
"""
from __future__ import annotations

import sympy as sp
import torch
from pydantic import Field

from ..cost import Cost, Symbols
from ..registry import Op, OpEnv, register
from . import _kernelized as kern
from ._common import attention_cost, head_symbols, position_cost, rotates, weightless_shape
from .performer import PerformerAttention, PerformerParams, performer_cost


class SlimParams(PerformerParams):
    chunk: int = Field(64, ge=1, le=1 << 16, description="C: tokens per chunk of the causal sums")


class _ChunkedPrefixSums(torch.autograd.Function):
    """fq, fk [b, h, n, F], v [b, h, n, e] -> [b, h, n, e]: phi(q_i)^T sum_{j <= i} phi(k_j) v_j^T, C at a time."""

    @staticmethod
    def forward(ctx, fq, fk, v, c: int):
        n = fq.shape[2]
        out = v.new_empty(*fq.shape[:3], v.shape[-1])
        s = v.new_zeros(*fq.shape[:2], fq.shape[-1], v.shape[-1])
        future = torch.ones(c, c, dtype=torch.bool, device=fq.device).triu(1)
        for t in range(0, n, c):
            qc, kc, vc = fq[:, :, t:t + c], fk[:, :, t:t + c], v[:, :, t:t + c]
            a = (qc @ kc.transpose(-1, -2)).masked_fill_(future[:qc.shape[2], :qc.shape[2]], 0.0)
            out[:, :, t:t + c] = (qc @ s).add_(a @ vc)
            del a  # (freed before the next chunk's)
            s += kc.transpose(-1, -2) @ vc
        ctx.save_for_backward(fq, fk, v, s)
        ctx.c = c
        return out

    @staticmethod
    def backward(ctx, go):
        fq, fk, v, s = ctx.saved_tensors
        c, n = ctx.c, fq.shape[2]
        dq, dk, dv = torch.empty_like(fq), torch.empty_like(fk), torch.empty_like(v)
        r = torch.zeros_like(s)  # the gradient of the state after the chunk: sum over later chunks of fq^T go
        future = torch.ones(c, c, dtype=torch.bool, device=fq.device).triu(1)
        s = s.clone()
        for t in reversed(range(0, n, c)):
            qc, kc, vc, gc = fq[:, :, t:t + c], fk[:, :, t:t + c], v[:, :, t:t + c], go[:, :, t:t + c]
            s -= kc.transpose(-1, -2) @ vc  # the state before the chunk
            mask = future[:qc.shape[2], :qc.shape[2]]
            ga = (gc @ vc.transpose(-1, -2)).masked_fill_(mask, 0.0)  # the gradient of the C x C products
            a = (qc @ kc.transpose(-1, -2)).masked_fill_(mask, 0.0)
            dq[:, :, t:t + c] = (gc @ s.transpose(-1, -2)).add_(ga @ kc)
            dk[:, :, t:t + c] = (ga.transpose(-1, -2) @ qc).add_(vc @ r.transpose(-1, -2))
            dv[:, :, t:t + c] = (a.transpose(-1, -2) @ gc).add_(kc @ r)
            r += qc.transpose(-1, -2) @ gc
            del a, ga
        return dq, dk, dv, None


class SlimAttention(PerformerAttention):
    def __init__(self, p: SlimParams, env: OpEnv):
        super().__init__(p, env)
        self.chunk = p.chunk

    def _causal(self, fq, fk, v):
        fk, v = self.expand_kv(fk), self.expand_kv(v)
        if not isinstance(fq.shape[2], int) or torch.jit.is_tracing() or torch.compiler.is_exporting():
            return kern.prefix_sums(fq, fk, v)
        return _ChunkedPrefixSums.apply(fq, fk, kern.ones_column(v), min(self.chunk, fq.shape[2]))


def slim_cost(p: SlimParams, env: OpEnv, s: Symbols) -> Cost:
    """Bidirectional: mha(performer)'s. Causal: Performer's features, then the chunks (m of C tokens and one of r,
    per head: the C x C products, phi(Q) S, A [V 1], the state update; the backward recomputes the products and
    the state's recovery: (6 F + 4 e) per pair of a chunk's tokens, 10 F e per token). Kept: Performer's
    features (q and k copied, phi(q), phi(k), W scaled twice), [V 1] (and phi(K) repeated, grouped K/V heads)
    at the query heads, the final state, [num den] (and den clamped), o_proj's copy: nothing per chunk."""
    if not env.causal:
        return performer_cost(p, env, s)
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    F = s.sym("m", p.features)
    pos = position_cost(env, s, h, kv, dh)
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    e = dh + 1
    c = sp.Min(p.chunk, n)
    M = sp.floor(n / c)
    pairs = b * h * (M * c ** 2 + (n - M * c) ** 2)  # within-chunk query-key pairs
    logits = 2 * b * n * (h + kv) * dh * F
    feat = Cost(fwd=logits, bwd=logits, fwd_other=b * n * (h + kv) * (4 * F + 2 * dh),
                bwd_other=2 * b * n * (h + kv) * (4 * F + 2 * dh))
    fwd = 2 * (F + e) * pairs + 4 * b * h * n * F * e
    kernel = Cost(fwd=fwd, bwd=(6 * F + 4 * e) * pairs + 10 * b * h * n * F * e, fwd_other=pairs + b * h * n * e,
                  bwd_other=2 * pairs + 2 * b * h * n * e)
    fq, fk = b * h * n * F * by, b * kv * n * F * by
    grouped = p.kv_heads not in (None, p.heads)
    rep = b * h * n * F * by if grouped else 0  # phi(K) at the query heads
    oN, state = b * h * n * e * by, b * h * F * e * by
    clone = 0 if rotates(env) else 1
    building = [q + 2 * kvb + q * (1 + clone) + fq + b * h * n * by + F * dh * by,
                q + 2 * kvb + fq + kvb * (1 + clone) + fk + b * kv * n * by + F * dh * by]
    base = kvb + fq + fk
    saved = q + kvb + fq + fk + 2 * F * dh * by + rep + oN + state + oN + b * h * n * by + q + pos.saved
    bh = b * h * by
    vrep = b * h * n * dh * by if grouped else 0  # V at the query heads, before [V 1]
    phases = [*building, base + rep + vrep + 2 * oN + state + c ** 2 + bh * (c ** 2 + 2 * c * e),  # a chunk's
              # products beside [V 1], [num den] and the state
              base + oN + b * h * n * by + q, 2 * q + out]  # the division, o_proj
    if env.pos is not None:
        phases.append(q + 2 * kvb + pos.peak)
    # backward: in a chunk, the gradients of [num den], phi(Q), phi(K), [V 1], the state's and its recovery, the
    # chunk's products and their gradients; o_proj's copy, den clamped and [num den] released
    bwd = [4 * q, 2 * oN + 2 * b * h * n * F * by + 2 * state + c ** 2 + bh * (2 * c ** 2 + 2 * c * F)
           - q - b * h * n * by - oN]
    return attention_cost(p, s, h, kv, dh, feat + kernel, pos, saved, phases, cache=b * kv * (F * dh + F + 1) * by,
                          bwd_phases=bwd)


OP = register(Op(
    decode="the running sums S [m x dh] and z [m] per K/V head and their scale: constant in the tokens seen",
    family="mha", variant="slim", params=SlimParams, module=SlimAttention,
    causal="yes", shape=weightless_shape("mha(slim)"), supports=frozenset({"rope"}),
    paper="Sub-Linear Memory: How to Make Performers SLiM, Likhosherstov et al. 2020, arXiv:2012.11346",
    summary="Performer (FAVOR+) whose causal prefix sums run in chunks of C tokens with a reversible backward "
            "(the state recovered by subtraction, each chunk recomputed): training keeps O(m dh) beyond the features",
    note="",  # no note in the reference; CATALOG.md lists it
    cost=slim_cost,
))
