"""mha(flowformer, eps=1e-6): Flowformer's flow attention (Wu, Wu, Xu, Wang & Long 2022), linear attention made
to conserve flow.

Per head, phi = sigmoid on q and k (the authors' non-negative map), queries as sinks and keys as sources:

    incoming  I_i = 1 / (phi(q_i) + eps)^T (sum_j phi(k_j) + eps)       outgoing O_j = 1 / (phi(k_j) + eps)^T (sum_i phi(q_i) + eps)
    conserved I^_i = (phi(q_i) + eps)^T (sum_j O_j phi(k_j) + eps),     O^_j = clamp((phi(k_j) + eps)^T (sum_i I_i phi(q_i) + eps), -1, 1)
    allocation a_i = sigmoid(I^_i),   competition c_j = n softmax_j(O^_j)
    o_i = a_i (I_i phi(q_i))^T sum_j phi(k_j) (c_j v_j)^T

(eps inside the sums, as the authors' code adds it.) The causal form (the paper's, as the authors' code writes
it): every sum runs over positions <= i and is normalised by the count i + 1: I_i and O_j are multiplied by it,
I^_i and O^_j divided by it, c_j = (j + 1) exp(O^_j) / sum_{t <= j} exp(O^_t), and the query reads
I_i / (i + 1) phi(q_i). The flows are O(n dh) (cumulative sums); the product is mha(fanet)'s right product
(_rightproduct.py), in chunks of C tokens causally: O(n C dh + n dh^2), never n x n. K/V heads are repeated to
the query heads (each query head has its own flow network over them). Padding: padded positions take no part
in any sum and the counts are the real tokens'. Decoding keeps the five running sums and sum_j phi(k_j) (c_j v_j)^T
per query head.
"""
from __future__ import annotations

import sympy as sp
import torch
from pydantic import Field

from ...decode import slot
from ..cost import Cost, Symbols
from ..registry import Op, OpEnv, register
from ._common import AttentionParams, attention_cost, head_symbols, weightless_shape
from ._rightproduct import RightProductAttention


class FlowformerParams(AttentionParams):
    eps: float = Field(1e-6, gt=0.0, le=1.0, description="added to phi(q), phi(k) and their sums in the flows")


class FlowformerAttention(RightProductAttention):
    """RightProductAttention's chunked and prefix-sum products, with the flows around them."""

    def __init__(self, p: FlowformerParams, env: OpEnv):
        super().__init__(p, env)
        self.eps = p.eps

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        o = self._attend(x, ctx)  # its temporaries released before o_proj
        return self.out(o)

    def _attend(self, x, ctx):
        q, k, v = self.qkv(x)
        fq, fk, v = q.sigmoid(), self.expand_kv(k).sigmoid(), self.expand_kv(v)
        del q, k
        key_mask = self.key_mask(ctx)
        keep = None if key_mask is None else key_mask[:, None, :, None].to(fq.dtype)
        if keep is not None:  # padded positions take no part in the sums
            fq, fk = fq * keep, fk * keep
        n = x.shape[1]
        if not self.causal:
            return self._bidirectional(fq, fk, v, keep, n)
        count = (torch.arange(1, n + 1, device=x.device, dtype=fq.dtype)[:, None] if keep is None
                 else keep.cumsum(2).clamp_(min=1))
        fq, competition, allocation, _ = self._causal_flows(fq, fk, count, keep)
        v = v * competition
        if not isinstance(n, int) or torch.jit.is_tracing():
            return self._prefix_sums(fq, fk, v).mul_(allocation)
        return self._chunked(fq, fk, v, allocation)

    def _bidirectional(self, fq, fk, v, keep, n):
        eps = self.eps
        count = n if keep is None else keep.sum(2, keepdim=True)  # the real keys
        incoming = ((fq + eps) * (fk.sum(2, keepdim=True) + eps)).sum(-1, keepdim=True).reciprocal_()
        outgoing = ((fk + eps) * (fq.sum(2, keepdim=True) + eps)).sum(-1, keepdim=True).reciprocal_()
        sink = ((fq + eps) * ((fk * outgoing).sum(2, keepdim=True) + eps)).sum(-1, keepdim=True)
        source = ((fk + eps) * ((fq * incoming).sum(2, keepdim=True) + eps)).sum(-1, keepdim=True).clamp(-1.0, 1.0)
        if keep is not None:
            source = source.masked_fill(keep == 0, float("-inf"))
        competition = source.softmax(2) * count
        g = fk.transpose(-1, -2) @ (v * competition)  # [b, h, dh, dh]
        return ((fq * incoming) @ g).mul_(sink.sigmoid())

    def _causal_flows(self, fq, fk, count, keep=None, state=None, sums=False):
        """The causal flows at positions with `count` tokens up to each (keep: real positions), continuing the
        running sums `state` (decoding; None: from the start). Returns the query I_i / count phi(q_i), the
        competition c, the allocation a, and (sums=True) the running sums after the last position."""
        eps = self.eps
        ks, qs, ko, qi, es = state if state is not None else (0.0,) * 5
        kc, qc = fk.cumsum(2) + ks, fq.cumsum(2) + qs
        incoming = count / ((fq + eps) * (kc + eps)).sum(-1, keepdim=True)
        outgoing = count / ((fk + eps) * (qc + eps)).sum(-1, keepdim=True)
        koc, qic = (fk * outgoing).cumsum(2) + ko, (fq * incoming).cumsum(2) + qi
        sink = ((fq + eps) * (koc + eps)).sum(-1, keepdim=True) / count
        source = (((fk + eps) * (qic + eps)).sum(-1, keepdim=True) / count).clamp_(-1.0, 1.0)
        e = source.exp_() if keep is None else source.exp_() * keep
        ec = e.cumsum(2) + es
        # a padded position before every token: e and its sum 0, its competition 0 (1 added to the sum)
        competition = e / (ec if keep is None else ec + (1 - keep)) * count
        last = tuple(t[:, :, -1:].clone() for t in (kc, qc, koc, qic, ec)) if sums else None
        return fq * (incoming / count), competition, sink.sigmoid_(), last

    def _step(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """Decoding: the new tokens continue the running sums (phi(k), phi(q), O phi(k), I phi(q), exp(O^)) and
        read G = sum_j phi(k_j) (c_j v_j)^T and each other causally; G then takes them in. Per query head."""
        q, k, v = self.qkv(x, ctx.offset)
        fq, fk, v = q.sigmoid(), self.expand_kv(k).sigmoid(), self.expand_kv(v)
        b, h, t, dh = fq.shape
        key = slot(ctx, self)
        *state, g = ctx.cache.caches.get(key, (None,) * 5 + (fq.new_zeros(b, h, dh, dh),))
        count = torch.arange(ctx.offset + 1, ctx.offset + t + 1, device=x.device, dtype=q.dtype)[:, None]
        fq, competition, allocation, sums = self._causal_flows(fq, fk, count, state=None if state[0] is None
                                                               else state, sums=True)
        v = v * competition
        a = (fq @ fk.transpose(-1, -2)).masked_fill_(torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1), 0.0)
        ctx.cache.caches[key] = (*sums, g + fk.transpose(-1, -2) @ v)
        return self.out((fq @ g + a @ v) * allocation)


def flowformer_cost(p: FlowformerParams, env: OpEnv, s: Symbols) -> Cost:
    """The right product (_rightproduct.py's FLOPs) at the query heads: bidirectional phi(K)^T (c V) and
    (I phi(Q)) G; causal, per chunk of C tokens, the C x C products and the states. The flows are elementwise
    and sums over positions: O(n dh) each."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    u, g = b * h * n * by, b * h * dh ** 2 * by  # one number per position and head; G
    grouped = kv != h
    if env.causal:
        c = sp.Min(FlowformerAttention.chunk, n)
        N = sp.ceiling(n / c) * c
        t, a, st = b * h * N * dh * by, b * h * N * c * by, b * h * N / c * dh ** 2 * by
        padded = sp.Min(1, N - n)
        fwd = 4 * b * h * N * c * dh + 4 * b * h * N * dh ** 2
        other = 30 * b * h * n * dh + 20 * b * h * n + b * h * N * c + b * h * N / c * dh ** 2
        # kept: the flows' operands (13 [b, h, n, dh] tensors, 10 per position and head, the counts), the
        # chunked phi(q), phi(k), c v (with grouped K/V heads, unpadded, one a view), the mask, A, the states
        saved = 13 * q + 10 * u + n * by + 3 * t - (t * (1 - padded) if grouped else 0) + c ** 2 + a + st
        chunks = t + 2 * t * (padded if grouped else 1)  # phi(q) chunked; phi(k), c v (repeated K/V heads: views)
        phases = [10 * q + 3 * u + n * by,  # the flows: phi(q), phi(k), v, their sums and products
                  3 * q + 2 * u + n * by + chunks + c ** 2 + a + st + 2 * t,  # at A (c v): the chunks, A, the states
                  t + q + out]  # at o_proj
        # backward: the allocation's product (the result's gradient, chunked, and three [b, h, n, dh] tensors,
        # o_proj's copy released); then A's gradient (measured within 4%)
        bwd = [2 * t + 2 * q, a + t - q]
    else:
        fwd = 4 * b * h * n * dh ** 2
        other = 30 * b * h * n * dh + 20 * b * h * n
        # kept: the flows' operands (11 [b, h, n, dh] tensors: phi(q), phi(k) and their shifted copies, the
        # products, c v, o_proj's copy), 6 per position and head, 4 sums, G; with several sequences and a K/V head
        # per query head, a copy for the batched matmul
        saved = 11 * q + 6 * u + 4 * b * h * dh * by + g + (0 if grouped else q * sp.Min(1, b - 1))
        # at (I phi(Q)) G: v, phi(q), phi(k), I phi(q), the result, five per position and head, G; at o_proj
        phases = [5 * q + 5 * u + g + q * sp.Min(1, b - 1), 3 * q]  # (several sequences: I phi(q) copied)
        if grouped:  # k and v repeated to the query heads, phi(k) made
            phases.append(q + 2 * kvb + 3 * q)
        bwd = [2 * q + u]
    core = Cost(fwd=fwd, bwd=2 * fwd, fwd_other=other, bwd_other=2 * other)
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=b * h * (dh ** 2 + 4 * dh + 1) * by,
                          bwd_phases=bwd)


OP = register(Op(
    decode="five running sums ([dh] and one number) and sum_j phi(k_j) (c_j v_j)^T [dh x dh] per query head: "
           "constant in the tokens seen",
    family="mha", variant="flowformer", params=FlowformerParams, module=FlowformerAttention,
    causal="yes", shape=weightless_shape("mha(flowformer)"),
    paper="Flowformer: Linearizing Transformers with Conservation Flows, Wu et al. 2022, arXiv:2202.06258",
    summary="sigmoid(I^_i) (I_i phi(q_i))^T sum_j phi(k_j) (c_j v_j)^T, phi = sigmoid, I, O the incoming and "
            "outgoing flows, c = n softmax(conserved O) (competition); causal: prefix sums normalised by i + 1",
    note="MHA/Others/009.md",
    cost=flowformer_cost,
))
