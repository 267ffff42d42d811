"""mha(rfa, features=m, gate=false): Random Feature Attention (Peng et al. 2021), random Fourier features.

Per head, with q, k l2-normalised (unit vectors), w_i = sigma * omega_i (omega_i ~ N(0, I_dh), sigma in R^dh
learned, the paper's learned variance by reparameterisation, initialised to 1) and

    phi(x) = sqrt(1/m) [sin(w_1^T x), .., sin(w_m^T x), cos(w_1^T x), .., cos(w_m^T x)]      (2m features)
    E[phi(x)^T phi(y)] = exp(-|sigma * (x - y)|^2 / 2)  ~  exp(sigma^2 x^T y) for unit x, y (isotropic sigma)

    RFA:        out_t = phi(q_t)^T S / max(phi(q_t)^T z, eps),   S = sum_j phi(k_j) v_j^T,  z = sum_j phi(k_j)
    causal:     the sums over j <= t (in chunks: _kernelized.py)
    gate=true:  S_t = g_t S_{t-1} + (1 - g_t) phi(k_t) v_t^T,  z_t likewise,  g_t = sigmoid(w_g . x_t + b_g)

The features are not positive, so phi(q)^T z can be near zero or negative: as the authors' code does, the
denominator is clamped from below (eps, default 1e-3, the clamp of the authors' attention weights; their
decoder's step clamps at 1.0; it also gives a query with no key, a padded position
before every token, the output 0). The gate is the paper's recency bias of the causal (decoder) form, one gate
per K/V head (the state it decays is per K/V head); bidirectional with gate=true is refused. omega is drawn once
per K/V head at construction from torch's generator (evodsl.compile(seed=...)) and kept as the buffer `omega`,
part of the module's state: a saved module reproduces. The gated causal form runs its recurrence over chunks
(a loop over n / C chunk states); it has no export form (E406). Rope rotates q and k before the normalisation:
with an isotropic sigma the kernel then reads q^T R_{j-i} k, relative. Score biases (ALiBi) have no place.
"""
from __future__ import annotations

import sympy as sp
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...decode import slot
from ...diagnostics import Diagnostic, EvoError
from ..cost import Cost, Symbols, linear
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
        o, _ = kern.gated(fq, fk, v, lg, l1, fq.new_zeros(b, h, fk.shape[-1], v.shape[-1]))
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
            o, s = kern.gated(fq.unsqueeze(2), self.expand_kv(fk).unsqueeze(2),
                         kern.ones_column(self.expand_kv(v)).unsqueeze(2), lg, l1, self.expand_kv(s), last=True)
            o, s = o[:, :, 0], s[:, ::self.heads // self.kv_heads].contiguous()
        ctx.cache.caches[slot(ctx, self)] = (s,)
        return self.out(o[..., :-1] / o[..., -1:].clamp_min(self.eps))


def rfa_cost(p: RFAParams, env: OpEnv, s: Symbols) -> Cost:
    """The projections W q / |q| (m x dh per position and head, W = sigma * omega with a gradient), sin and cos,
    then the kernel on the 2m features (_kernelized.kernel_cost); gated, the recurrence over chunks instead.
    Kept per side (q, k): its input and norm (twice), W repeated per sequence and head, the normalised copy,
    the projections (for sin and cos) and the features."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    m = s.sym("m", p.features)
    pos = position_cost(env, s, h, kv, dh)
    q, kvb = b * n * h * dh * by, b * n * kv * dh * by
    proj = 2 * b * n * (h + kv) * dh * m
    fq, fk = 2 * b * h * n * m * by, 2 * b * kv * n * m * by
    other = b * n * (h + kv) * (5 * m + 3 * dh)
    feat = Cost(params=kv * dh, fwd=proj, bwd=2 * proj, fwd_other=other, bwd_other=2 * other)
    sides = 2 * (q + kvb) + 2 * b * n * (h + kv) * by + b * (h + kv) * m * dh * by + b * n * (h + kv) * m * by
    w = kv * m * dh * by  # sigma * omega
    building = [q + 2 * kvb + w + h * m * dh * by + 3 * fq / 2 + fq,  # phi(q): u, sin u, cos u, their concatenation
                q + 2 * kvb + w + fq + 3 * fk / 2 + fk]
    if p.gate:
        return _gated_cost(p, env, s, h, kv, dh, m, feat, pos, sides, building, fq, fk)
    grouped = p.kv_heads not in (None, p.heads)
    kernel = kern.kernel_cost(s, env, h, kv, dh, 2 * m, fq, fk, grouped, RFAAttention.chunk, positive=False)
    read = fq + fk  # the features the kernel reads as they are (its matmuls keep them); causal, only unpadded
    if env.causal:
        c = sp.Min(RFAAttention.chunk, n)
        read = (fq + (0 if grouped else fk)) * (1 - sp.Min(1, sp.ceiling(n / c) * c - n))
    saved = sides + read + kernel.saved + pos.saved
    phases = [*building, *kernel.phases] + ([q + 2 * kvb + pos.peak] if env.pos is not None else [])
    return attention_cost(p, s, h, kv, dh, feat + kernel.flops, pos, saved, phases,
                          cache=b * kv * 2 * m * (dh + 1) * by, bwd_phases=kernel.bwd_phases)


def _gated_cost(p, env, s, h, kv, dh, m, feat, pos, sides, building, fq, fk) -> Cost:
    """The gated causal form: the gate (a linear d -> kv), per chunk the decays (a C x C block), A, each key's
    weight, the chunk's own state; the loop's states, stacked; phi(q) decayed; A [v 1] and the states read."""
    b, n, by = s.b, s.n, s.bytes
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    c = sp.Min(RFAAttention.chunk, n)
    N = sp.ceiling(n / c) * c
    f, e = 2 * m, dh + 1
    gate = linear(s, s.d, kv, True)
    single = 2 - sp.Min(2, N / c)  # one chunk: the states read are the zeros, which have no gradient
    own = 2 * b * h * (N - c) * f * e  # the chunks' own states (not the last's: no chunk reads it)
    fwd = 2 * b * h * N * c * (f + e) + 2 * b * h * N * f * e + own
    other = 6 * b * h * N * c + 3 * b * h * N * f + b * h * N / c * f * e + 8 * b * kv * n
    core = gate + Cost(fwd=fwd, bwd=2 * fwd - 2 * b * h * N * f * e * single, fwd_other=other, bwd_other=2 * other)
    fN, oN, a, g = b * h * N * f * by, b * h * N * e * by, b * h * N * c * by, b * h * N * by
    states, m1 = b * h * N / c * f * e * by, b * h * (N - c) * by  # all chunks' states; elements of all but one
    # kept: the gate's input to logsigmoid (and its buffers, -a), the mask; the decays, A before and after
    # their product; phi(q), phi(k) chunked, [v 1]; each key's weight and weighted phi(k), but the last chunk's;
    # the loop's carries and states (but the last), their stack; phi(q) decayed and its decays; [num den] (and
    # den clamped), o_proj's copy
    saved = (sides + 4 * b * kv * n * by + c ** 2 + 3 * a + 2 * fN + oN + m1 * (1 + f) + (m1 / c) * (1 + f * e)
             + g + states + fN * (1 - single) + oN + b * h * n * by + q + pos.saved)
    padded = sp.Min(1, N - n)
    chunks = fN * padded + fN * (1 if p.kv_heads not in (None, p.heads) else padded)  # copies (else views)
    base = kvb + fq + fk + chunks + oN + 2 * g + c ** 2  # v, the features, their chunks, [v 1], log g, log(1 - g)
    phases = [*building, base + 3 * a,  # the decays built
              base + 2 * a + fN + states,  # the chunks' own states
              base + 2 * a + 3 * states + fN + 2 * oN,  # [num den]
              kvb + fq + fk + oN + b * h * n * by + q, 2 * q + out]
    if env.pos is not None:
        phases.append(q + 2 * kvb + pos.peak)
    # backward: approximate (measured -26% .. +24% at b <= 2, n <= 160, m <= 128; tests/ops/test_rfa.py): at the
    # division; A's gradient beside [num den]'s; two feature-sized gradients at once
    bwd = [4 * q, a + oN, 2 * fN - oN]
    return attention_cost(p, s, h, kv, dh, feat + core, pos, saved, phases, cache=b * kv * f * e * by,
                          bwd_phases=bwd)


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
