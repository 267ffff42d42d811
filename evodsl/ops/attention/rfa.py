"""mha(rfa, features=m, gate=false): Random Feature Attention (Peng et al. 2021), random Fourier features.

Per head, with q, k l2-normalised (unit vectors), w_i = sigma * omega_i (omega_i ~ N(0, I_dh), sigma in R^dh
learned, the paper's learned variance by reparameterisation, initialised to 1) and

    phi(x) = sqrt(1/m) [sin(w_1^T x), .., sin(w_m^T x), cos(w_1^T x), .., cos(w_m^T x)]      (2m features)
    E[phi(x)^T phi(y)] = exp(-|sigma * (x - y)|^2 / 2)  ~  exp(sigma^2 x^T y) for unit x, y (isotropic sigma)

    RFA:        out_t = phi(q_t)^T S / max(phi(q_t)^T z, eps),   S = sum_j phi(k_j) v_j^T,  z = sum_j phi(k_j)
    causal:     the sums over j <= t (in chunks: _kernelized.py)
    gate=true:  S_t = g_t S_{t-1} + (1 - g_t) phi(k_t) v_t^T,  z_t likewise,  g_t = sigmoid(w_g . x_t + b_g)

The features are not positive, so phi(q)^T z can be near zero or negative: as the authors' code does, the
denominator is clamped from below (eps, default 1e-3; it also gives a query with no key, a padded position
before every token, the output 0). The gate is the paper's recency bias of the causal (decoder) form, one gate
per K/V head (the state it decays is per K/V head); bidirectional with gate=true is refused. omega is drawn once
per K/V head at construction from torch's generator (evodsl.compile(seed=...)) and kept as the buffer `omega`,
part of the module's state: a saved module reproduces. The gated causal form runs its recurrence over chunks
(a loop over n / C chunk states); it has no export form (E406). Rope rotates q and k before the normalisation:
with an isotropic sigma the kernel then reads q^T R_{j-i} k, relative. Score biases (ALiBi) have no place.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...decode import slot
from ...diagnostics import Diagnostic, EvoError
from ..cost import Cost, Symbols
from ..registry import Op, OpEnv, ShapeProblem, register
from . import _kernelized as kern
from ._common import AttentionBase, AttentionParams, attention_cost, head_symbols, position_cost, weightless_shape


class RFAParams(AttentionParams):
    features: int = Field(64, ge=1, le=1 << 16, description="m: random vectors per K/V head (phi has 2m features)")
    gate: bool = Field(False, description="the gated recurrence S_t = g_t S_{t-1} + (1 - g_t) phi(k_t) v_t^T "
                                          "(causal only)")
    eps: float = Field(1e-3, gt=0.0, le=1.0, description="the denominator phi(q)^T z is clamped to at least eps")


def rfa_shape(p: RFAParams, env: OpEnv):
    if p.gate and not env.causal:
        raise ShapeProblem("mha(rfa, gate=true) gates the causal recurrence S_t = g_t S_{t-1} + .. only: a "
                           "bidirectional model has no order to decay along", "gate",
                           "use gate=false here (the paper gates its causal, decoder-side attention)")
    return weightless_shape("mha(rfa)")(p, env)


def rfa_features(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """phi(x / |x|): x [b, H, n, dh], w [H, m, dh] (or broadcastable) -> [b, H, n, 2m]."""
    u = F.normalize(x, dim=-1) @ w.transpose(-1, -2)
    return torch.cat((u.sin(), u.cos()), -1).mul_(w.shape[-2] ** -0.5)


def gated(fq, fk, v, lg, l1, s):
    """The gated recurrence over chunks: fq, fk [b, h, m, c, F], v = [v 1] [b, h, m, c, e + 1], lg = log g,
    l1 = log(1 - g) [b, h, m, c]; s = [S z] [b, h, F, e + 1] the state before the first chunk. Within a chunk,
    key j reaches query i >= j with weight (1 - g_j) prod_{j < t <= i} g_t; the state before each chunk is the
    one before the last, decayed by that chunk's gates, plus its keys. Returns [num den] and the last state."""
    c = fq.shape[-2]
    cum = lg.cumsum(-1)  # log prod_{t <= i} g_t within the chunk
    future = torch.ones(c, c, dtype=torch.bool, device=fq.device).triu(1)
    decay = (cum.unsqueeze(-1) - cum.unsqueeze(-2) + l1.unsqueeze(-2)).masked_fill_(future, -math.inf).exp_()
    a = (fq @ fk.transpose(-1, -2)).mul_(decay)
    own = (fk * (cum[..., -1:] - cum + l1).exp_().unsqueeze(-1)).transpose(-1, -2) @ v  # at the chunk's end
    carry = cum[..., -1].exp()[..., None, None]  # [b, h, m, 1, 1]
    states = []
    for i in range(fq.shape[2]):
        states.append(s)
        s = carry[:, :, i] * s + own[:, :, i]
    # the state before the chunk reaches query i decayed by g_1 .. g_i
    return (fq * cum.exp().unsqueeze(-1) @ torch.stack(states, 2)).add_(a @ v), s


class RFAAttention(AttentionBase):
    chunk = 64  # C, tokens per chunk of the causal forms

    def __init__(self, p: RFAParams, env: OpEnv):
        super().__init__(p, env)
        self.eps = p.eps
        self.register_buffer("omega", torch.randn(self.kv_heads, p.features, self.head_dim))
        self.sigma = nn.Parameter(torch.ones(self.kv_heads, 1, self.head_dim))
        self.gate = nn.Linear(env.d, self.kv_heads) if p.gate else None

    def _features(self, q, k):
        w = self.sigma * self.omega  # [kv, m, dh]
        return rfa_features(q, self.expand_kv(w.unsqueeze(0))), rfa_features(k, w)

    def _gates(self, x, key_mask=None):
        """log g and log(1 - g), [b, kv, n]; a padded token leaves the state as it is (g = 1)."""
        a = self.gate(x).transpose(1, 2)
        lg, l1 = F.logsigmoid(a), F.logsigmoid(-a)
        if key_mask is not None:
            lg = lg.masked_fill(~key_mask[:, None, :], 0.0)
        return lg, l1

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        return self.out(self._attend(x, ctx))

    def _attend(self, x, ctx):
        q, k, v = self.qkv(x)
        fq, fk = self._features(q, k)
        del q, k  # (not needed further: freed before the kernel)
        key_mask = self.key_mask(ctx)
        if key_mask is not None:  # padded keys add nothing to the sums
            fk = fk * key_mask[:, None, :, None]
        if self.gate is not None:
            o = self._gated(x, fq, fk, v, key_mask)
        elif self.causal:
            o = kern.causal(fq, self.expand_kv(fk), self.expand_kv(v), self.chunk)
        else:
            o = kern.bidirectional(fq, fk, v, self.expand_kv)
        return o[..., :-1] / o[..., -1:].clamp_min(self.eps)  # num / den

    def _gated(self, x, fq, fk, v, key_mask):
        b, h, n, _ = fq.shape
        if not isinstance(n, int) or torch.jit.is_tracing() or torch.compiler.is_exporting():
            raise EvoError([Diagnostic("E406", "mha(rfa, gate=true) has no export form: its gated recurrence "
                                               "runs as a loop over chunks, which a graph for every length cannot "
                                               "hold", help="export with gate=false, or run it in torch")])
        c = min(self.chunk, n)
        pad = -n % c
        lg, l1 = (self.expand_kv(t).unsqueeze(-1) for t in self._gates(x, key_mask))
        lg, l1 = (kern.chunked(t, c, pad)[..., 0] for t in (lg, l1))
        fq, fk = kern.chunked(fq, c, pad), kern.chunked(self.expand_kv(fk), c, pad)
        v = kern.chunked(kern.ones_column(self.expand_kv(v)), c, pad)
        o, _ = gated(fq, fk, v, lg, l1, fq.new_zeros(b, h, fk.shape[-1], v.shape[-1]))
        return o.view(b, h, -1, v.shape[-1])[:, :, :n]

    def _step(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """Decoding (causal): the (gated) running sums [S z] [2m x (dh + 1)] per K/V head."""
        q, k, v = self.qkv(x, ctx.offset)
        fq, fk = self._features(q, k)
        b, kvh, _, dh = v.shape
        f = fk.shape[-1]
        s = ctx.cache.caches.get(slot(ctx, self), (v.new_zeros(b, kvh, f, dh + 1),))[0]
        if self.gate is None:
            o, s = kern.step(fq, fk, v, s, self.expand_kv)
        else:  # one chunk of the new tokens at the query heads; a K/V head's state is its first query head's
            lg, l1 = (self.expand_kv(t).unsqueeze(2) for t in self._gates(x))
            o, s = gated(fq.unsqueeze(2), self.expand_kv(fk).unsqueeze(2),
                         kern.ones_column(self.expand_kv(v)).unsqueeze(2), lg, l1, self.expand_kv(s))
            o, s = o[:, :, 0], s[:, ::self.heads // self.kv_heads].contiguous()
        ctx.cache.caches[slot(ctx, self)] = (s,)
        return self.out(o[..., :-1] / o[..., -1:].clamp_min(self.eps))


def rfa_cost(p: RFAParams, env: OpEnv, s: Symbols) -> Cost:
    raise NotImplementedError


OP = register(Op(
    decode="the (gated) running sums S [2m x dh] and z [2m] per K/V head: constant in the tokens seen",
    family="mha", variant="rfa", params=RFAParams, module=RFAAttention,
    causal="yes", shape=rfa_shape, supports=frozenset({"rope"}),
    paper="Random Feature Attention, Peng et al. 2021, arXiv:2103.02143",
    summary="phi(q)^T sum_j phi(k_j) v_j^T / max(phi(q)^T sum_j phi(k_j), eps), phi = random Fourier features "
            "(sin, cos) of unit q, k; causal: prefix sums, optionally gated; O(n m dh)",
    note="",  # no note in the reference; CATALOG.md lists it
    cost=rfa_cost,
))
