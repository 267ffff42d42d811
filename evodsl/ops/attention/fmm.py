"""mha(fmm, w=W, kernels=L): FMMformer (Nguyen et al. 2021), near-field banded attention plus far-field low-rank
(linear) attention, blended with learned weights.

Per head, with s_tj = q_t . k_j / sqrt(dh) and the far-field feature maps phi_1 = elu(x) + 1, phi_2 = elu(-x) + 1,
phi_3 = tanh(x) + 1 (the first L of them, as in the authors' code),

    near_t  = sum_{j in W(t)} softmax_{j in W(t)}(s_tj) v_j,      causal W(t) = t-w+1 .. t, else |t - j| < w
    far_t^l = phi_l(q_t)^T sum_j phi_l(k_j) v_j^T / (phi_l(q_t)^T sum_j phi_l(k_j) + eps),   j <= t if causal
    o_t     = w_0 * near_t + sum_l w_l * far_t^l

with w_0, w_l in R^dh learned per head (elementwise; w_0 starts at 1, w_l at 1/L). The near field is a banded
matrix D, the far field the rank-L sum of kernels phi_l(Q) phi_l(K)^T, each normalised as in linear attention:
the paper's D + L decomposition of the attention matrix. O(n w dh + L n dh^2) time and memory.

The near field is mha(local)'s band (_banded.banded_attention), the far field mha(linear)'s kernels (its chunked
causal form, its chunk-by-chunk inference form, its bidirectional form) with each phi_l. Decoding keeps the
band's last w keys and values and the running sums S_l, z_l per feature map and K/V head. Padded keys leave the
band and add nothing to the sums. No position scheme inside (rope before phi would tie the far field to
absolute positions, ALiBi has no place in it): put one on the stream.
"""
from __future__ import annotations

from dataclasses import replace

import sympy as sp
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..cost import Cost, Symbols
from ..registry import Op, OpEnv, register
from ...decode import slot
from ._banded import band_layout, banded_attention, banded_attention_cost
from ._common import AttentionBase, AttentionParams, attention_shape, head_symbols, projections_cost
from .linear import LinearAttention, LinearAttentionParams, linear_attention_cost

FAR_FIELD_MAPS = (lambda x: F.elu(x) + 1, lambda x: F.elu(-x) + 1, lambda x: torch.tanh(x) + 1)


class FMMParams(AttentionParams):
    w: int = Field(16, ge=1, description="near-field band: causal, keys t-w+1 .. t; bidirectional, |t-j| < w")
    kernels: int = Field(2, ge=1, le=3, description="far-field feature maps: elu(x)+1, elu(-x)+1, tanh(x)+1, "
                                                    "the first `kernels`")
    eps: float = Field(1e-6, ge=0.0, description="added to each far-field denominator")


class FMMAttention(LinearAttention):
    def __init__(self, p: FMMParams, env: OpEnv):
        AttentionBase.__init__(self, p, env)
        self.window, self.eps, self.maps = p.w, p.eps, FAR_FIELD_MAPS[:p.kernels]
        self.near = nn.Parameter(torch.ones(self.heads, 1, self.head_dim))  # w_0, per head and channel
        self.far = nn.Parameter(torch.full((p.kernels, self.heads, 1, self.head_dim), 1.0 / p.kernels))  # w_l

    def forward(self, x, ctx=None):
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        q, k, v = self.qkv(x)
        key_mask = self.key_mask(ctx)
        keep = None if key_mask is None else key_mask[:, None, :, None].to(q.dtype)
        recording = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        inference = self.causal and not recording and isinstance(x.shape[1], int) and not torch.jit.is_tracing()
        kx, vx = (k, v) if inference else (self.expand_kv(k), self.expand_kv(v))  # inference reads K/V heads
        o = None
        for w, phi in zip(self.far, self.maps):  # the far field, one feature map at a time
            if inference:
                f = self._causal_inference(q, kx, vx, keep, phi)
            else:
                f = self._causal(q, kx, vx, keep, phi) if self.causal else self._bidirectional(q, kx, vx, keep, phi)
            o = f * w if o is None else o.addcmul_(f, w)
            del f
        if inference:
            kx, vx = self.expand_kv(k), self.expand_kv(v)
        lo = self.window - 1
        near = banded_attention(q, kx, vx, lo, 0 if self.causal else lo,
                                dropout=self.dropout if self.training else 0.0, key_mask=key_mask)
        return self.out(o.addcmul_(near, self.near))

    def _step(self, x, ctx):
        """Decoding (causal): the band over the cached last w keys and values, and each feature map's running
        sums; the cache holds (K, V, S_1, z_1, ..., S_L, z_L)."""
        q, k, v = self.qkv(x, ctx.offset)
        old = ctx.cache.caches.get(slot(ctx, self))
        near, kv = self.window_attend(q, k, v, None if old is None else old[:2], ctx.offset, self.window)
        o, states = near * self.near, [*kv]
        for i, (w, phi) in enumerate(zip(self.far, self.maps)):
            f, state = self._state_step(q, k, v, None if old is None else old[2 + 2 * i: 4 + 2 * i], phi)
            o, states = o.addcmul_(f, w), states + [*state]
        ctx.cache.caches[slot(ctx, self)] = tuple(states)
        return self.out(o)


def fmm_cost(p: FMMParams, env: OpEnv, s: Symbols) -> Cost:
    """mha(local)'s band (its forms and their costs, _band_cost.py) plus L times mha(linear)'s kernel, less the
    shared projections; the blend keeps each far-field output; decoding keeps the band's K/V and L states."""
    h, kv, dh = head_symbols(p, s)
    w, L = s.sym("w", p.w), p.kernels
    band = banded_attention_cost(p, env, s, lo=w - 1, hi=0 if env.causal else w - 1, cache_keys=w)
    lin = linear_attention_cost(LinearAttentionParams(heads=p.heads, kv_heads=p.kv_heads, head_dim=p.head_dim,
                                                      bias=p.bias, eps=p.eps), env, s)
    proj = projections_cost(p, s, h, kv, dh)
    b, n, by = s.b, s.n, s.bytes
    q = b * n * h * dh * by
    B, nb, _, Lk = band_layout(n, w - 1, 0 if env.causal else w - 1, wide=True)  # the band's blocks (training)
    covers = n <= w
    # o_proj reads the blended sum: a copy always in training (the far field's outputs are [b, h, n, dh]), where
    # the band's own output might have been read uncopied (one sequence, unpadded blocks; or one SDPA call)
    band_copy = sp.Piecewise((0, covers), (sp.Min(1, (b - 1) + (nb * B - n)), True))
    # v in the layout the far field's matmuls read: a copy per feature map, but for repeated K/V heads
    # (contiguous already: the feature maps share it) where no chunk is padded
    C = sp.Min(LinearAttention.chunk, n)
    unpadded = 1 - sp.Min(1, sp.ceiling(n / C) * C - n) if env.causal else 1
    shared_v = (L - 1) * q * unpadded if kv != h else 0
    saved = band.saved + (1 - band_copy) * q + L * lin.saved - shared_v
    # inference: each feature map's temporaries (mha(linear)'s, with one more chunk of phi(q) copied for the
    # matmuls and the causal mask) beside the blend of the earlier ones; then the band beside the blend
    chunk = b * h * C * dh * by + C ** 2 if env.causal else 0
    peak = sp.Max(band.peak + q, lin.peak + chunk + (q if L > 1 else 0))
    # backward: the band's first (it ran last), beside the gradient of its output (o_proj's copy, always made
    # here, released; with dropout the math kernel's own layout); then each feature map's, at the gradient of
    # its C x C blocks (causal) or its three temporaries (mha(linear)'s phases), beside the band's gradients of
    # q, k and v, the band's saved tensors and the blend's f_l released
    grads = sp.Piecewise((3 * q, covers), (b * h * (nb * B + 2 * Lk) * dh * by, True))
    t = b * h * sp.ceiling(n / C) * C * dh * by if env.causal else q
    far_phase = (3 * t + b * h * sp.ceiling(n / C) * C * C * by - t * (1 - unpadded) if env.causal else 5 * t)
    bwd_peak = sp.Max(band.bwd_peak + (band_copy * q if p.dropout == 0 else 0),
                      far_phase + grads - band.saved - (1 - band_copy) * q - q)  # and the blend's copy of f_l
    far = Cost(params=(1 + L) * h * dh, fwd=L * (lin.fwd - proj.fwd), bwd=L * (lin.bwd - proj.bwd),
               fwd_other=L * (lin.fwd_other - proj.fwd_other + 2 * b * n * h * dh),  # and the blend
               bwd_other=L * (lin.bwd_other - proj.bwd_other), cache=L * lin.cache)
    return replace(band, saved=saved, peak=peak, bwd_peak=bwd_peak,
                   fwd_inference=band.inference_fwd + L * (lin.inference_fwd - proj.fwd),
                   **{f: getattr(band, f) + getattr(far, f) for f in ("params", "fwd", "bwd", "fwd_other",
                                                                         "bwd_other", "cache")})


OP = register(Op(
    decode="the band's last w keys and values; per feature map the running sums S [dh x dh], z [dh] per K/V head",
    family="mha", variant="fmm", params=FMMParams, module=FMMAttention,
    causal="yes", shape=attention_shape, cost=fmm_cost,
    paper="FMMformer: Efficient and Flexible Transformer via Decomposed Near-field and Far-field Attention, "
          "Nguyen et al. 2021, arXiv:2108.02347",
    summary="w_0 * banded softmax (band w) + sum_l w_l * linear attention with phi_l (elu+1, elu(-x)+1, tanh+1), "
            "w learned per head and channel; causal: both causal; O(n w d + L n d dh)",
    note="MHA/LocalGlobal/004.md",
))
