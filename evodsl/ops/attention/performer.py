"""mha(performer, features=m): Performer's FAVOR+ (Choromanski et al. 2020), positive orthogonal random features.

Per head, with x' = x / dh^{1/4} (for q and k alike) and w_1..w_m in R^dh,

    phi(x) = exp(w_i^T x' - |x'|^2 / 2) / sqrt(m),  i = 1..m,     E[phi(q)^T phi(k)] = exp(q^T k / sqrt(dh))
    bidirectional:  out = D^{-1} phi(Q) (phi(K)^T V),   D = diag(phi(Q) phi(K)^T 1)
    causal:         the same with the sums over j <= i (prefix sums, in chunks: _kernelized.py)

an unbiased estimate of softmax attention's weights exp(q^T k / sqrt(dh)). The w_i are drawn as in the paper:
blocks of dh orthogonal rows (QR of a Gaussian matrix, signs fixed so that each block is Haar), each row then
given the length of an independent Gaussian vector (chi with dh degrees of freedom), so that each w_i is
marginally N(0, I) and the estimate stays unbiased. One draw per layer, shared by the heads, at construction
from torch's generator (evodsl.compile(seed=...) fixes it): the buffer `w` is part of the module's state
(state_dict), so a saved module reproduces; it is not redrawn (the paper's optional redraw is for training).

Stabilisation, as the authors' code: before exp, each query's logits lose their max over the m features and the
keys' logits the max over all keys and features of the sequence (per K/V head; padded keys left out). Each is
one constant per query in the numerator and the denominator alike, so the output is exactly the equation's
(the constants are detached: they have no gradient). The causal form's key constant is taken over the whole
sequence, which changes no output (it cancels); decoding keeps a running max and rescales its state when it
grows. No eps: the features are positive, so D > 0 unless a query has no key at all (a padded position before
every token), whose output is 0. Rope rotates q and k before phi: phi(q_i)^T phi(k_j) then estimates
exp(q^T R_{j-i} k / sqrt(dh)), relative, as in softmax attention. ALiBi's and other score biases have no place.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field

from ..cost import Cost, Symbols
from ..registry import Op, OpEnv, register
from ...decode import slot
from . import _kernelized as kern
from ._common import (AttentionBase, AttentionParams, attention_cost, head_symbols, position_cost, rotates,
                      weightless_shape)


class PerformerParams(AttentionParams):
    features: int = Field(256, ge=1, le=1 << 16, description="m: random features per head (the paper: ~ dh log dh)")


def orthogonal_gaussian(m: int, dh: int, generator=None) -> torch.Tensor:
    """[m, dh] float64: ceil(m / dh) blocks of dh orthonormal rows (Haar), the first m rows kept, each row scaled
    to the norm of an independent N(0, I_dh) vector."""
    blocks = []
    for _ in range(-(-m // dh)):
        q, r = torch.linalg.qr(torch.randn(dh, dh, generator=generator, dtype=torch.float64))
        blocks.append((q * torch.sign(torch.diagonal(r))).T)  # sign fix: Haar-distributed
    norms = torch.randn(m, dh, generator=generator, dtype=torch.float64).norm(dim=1, keepdim=True)
    return torch.cat(blocks)[:m] * norms


def favor_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """log phi(x) = w_i^T x' - |x'|^2 / 2 - log(m) / 2, x' = x / dh^{1/4}: [..., n, dh] -> [..., n, m]."""
    c = x.shape[-1] ** -0.25  # applied to w and to |x|^2: no scaled copy of x
    x = x.contiguous()  # one matmul over all positions and heads (a strided x would expand w per head)
    return (x @ (w.T * c)).sub_((x * x).sum(-1, keepdim=True) * (c * c / 2) + math.log(w.shape[0]) / 2)


class PerformerAttention(AttentionBase):
    chunk = 64  # C, tokens per chunk of the causal form

    def __init__(self, p: PerformerParams, env: OpEnv):
        super().__init__(p, env)
        self.register_buffer("w", orthogonal_gaussian(p.features, self.head_dim).to(torch.get_default_dtype()))
        if hasattr(self.pos, "adopt"):  # a scheme that sizes itself to the features (pos(permute))
            self.pos.adopt(self)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        if getattr(self.pos, "attends", False):  # pos(permute): the features permuted at their positions
            return self.pos.attend(self, x, ctx)
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        return self.out(self._attend(x, ctx))

    def _attend(self, x, ctx):
        q, k, v = self.qkv(x)
        fq = self._query_features(q)
        uk = self._key_logits(k)
        key_mask = self.key_mask(ctx)
        if key_mask is not None:  # padded keys add nothing to the sums: phi(k) = exp(-inf) = 0
            uk.masked_fill_(~key_mask[:, None, :, None], -math.inf)
        fk = uk.sub_(uk.detach().amax((-2, -1), keepdim=True)).exp_()  # in place: the logits are not kept
        del q, k, uk  # (not needed further: freed before the kernel)
        if self.causal:
            o = self._causal(fq, fk, v)
        else:
            o = kern.bidirectional(fq, fk, v, self.expand_kv)
        return o[..., :-1] / o[..., -1:].clamp_min(torch.finfo(o.dtype).tiny)  # num / den

    def _causal(self, fq, fk, v):
        """[num den] of the causal form (mha(slim) runs its own)."""
        return kern.causal(fq, self.expand_kv(fk), self.expand_kv(v), self.chunk)

    def _key_logits(self, k):
        """log phi(k) (a learned kernel adds its features' log weights here)."""
        return favor_logits(k, self.w)

    def _query_features(self, q):
        """phi(q) up to a constant per query: exp of the logits less their max over the m features."""
        u = favor_logits(q, self.w)
        return u.sub_(u.detach().amax(-1, keepdim=True)).exp_()

    def _step(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """Decoding (causal): the running sums [S z] = sum_j phi(k_j) [v_j 1]^T of the tokens seen, and the
        constant their features were scaled by (the running max of the keys' logits), per K/V head."""
        q, k, v = self.qkv(x, ctx.offset)
        fq, uk = self._query_features(q), self._key_logits(k)
        b, kvh, _, dh = k.shape
        m = self.w.shape[0]
        s, top = ctx.cache.caches.get(slot(ctx, self), (k.new_zeros(b, kvh, m, dh + 1),
                                                        k.new_full((b, kvh, 1, 1), -math.inf)))
        new_top = torch.maximum(top, uk.amax((-2, -1), keepdim=True))
        # the earlier features to the new constant (exp(-inf) = 0 before the first token)
        o, s = kern.step(fq, (uk - new_top).exp_(), v, s * (top - new_top).exp(), self.expand_kv)
        ctx.cache.caches[slot(ctx, self)] = (s, new_top)
        return self.out(o[..., :-1] / o[..., -1:].clamp_min(torch.finfo(o.dtype).tiny))


def performer_cost(p: PerformerParams, env: OpEnv, s: Symbols) -> Cost:
    """The logits W x' of q and k (m x dh per position and head; W has no gradient, so their backward is 1x),
    then the kernel on the features (_kernelized.kernel_cost). Kept: q and k as one contiguous copy each (the
    logits' matmul input), the features phi(q), phi(k) and W scaled (twice), beside the kernel's."""
    if env.pos is not None and getattr(env.pos[0].attach, "attends", False):  # pos(permute)
        return env.pos[0].attach.attention_cost(p, env, s)
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    m = s.sym("m", p.features)
    pos = position_cost(env, s, h, kv, dh)
    q, kvb = b * n * h * dh * by, b * n * kv * dh * by
    logits = 2 * b * n * (h + kv) * dh * m
    feat = Cost(fwd=logits, bwd=logits, fwd_other=b * n * (h + kv) * (4 * m + 2 * dh),
                bwd_other=2 * b * n * (h + kv) * (4 * m + 2 * dh))
    fq, fk = b * h * n * m * by, b * kv * n * m * by
    clone = 0 if rotates(env) else 1  # q, k made contiguous for the logits (rope's come back contiguous)
    # building phi(q), then phi(k): q, k, v, (phi(q),) the copy, the logits, x * x and its row sums, W scaled
    building = [q + 2 * kvb + q * (1 + clone) + fq + b * h * n * by + m * dh * by,
                q + 2 * kvb + fq + kvb * (1 + clone) + fk + b * kv * n * by + m * dh * by]
    kernel = kern.kernel_cost(s, env, h, kv, dh, m, fq, fk, p.kv_heads not in (None, p.heads),
                              PerformerAttention.chunk, positive=True)
    saved = q + kvb + fq + fk + 2 * m * dh * by + kernel.saved + pos.saved
    phases = [*building, *kernel.phases] + ([q + 2 * kvb + pos.peak] if env.pos is not None else [])
    return attention_cost(p, s, h, kv, dh, feat + kernel.flops, pos, saved, phases,
                          cache=b * kv * (m * dh + m + 1) * by, bwd_phases=kernel.bwd_phases)


OP = register(Op(
    decode="the running sums S [m x dh] and z [m] per K/V head and their scale: constant in the tokens seen",
    family="mha", variant="performer", params=PerformerParams, module=PerformerAttention,
    causal="yes", shape=weightless_shape("mha(performer)"), supports=frozenset({"rope", "permute"}),
    paper="Rethinking Attention with Performers, Choromanski et al. 2020, arXiv:2009.14794",
    summary="D^-1 phi(Q) (phi(K)^T V), phi(x) = exp(W x' - |x'|^2/2)/sqrt(m) with orthogonal random W: an "
            "unbiased estimate of softmax; causal: prefix sums; O(n m dh)",
    note="",  # no note in the reference; CATALOG.md lists it
    cost=performer_cost,
))
