"""mha(mgk, form=linear): Transformer-MGK's linear form (Nguyen et al. 2022, arXiv:2110.08678, "Transformer-MGK with
linear attention"), linear attention (Katharopoulos et al. 2020) with each key a mixture of r keys:

    h_i = phi(q_i)^T sum_j sum_r pi_r phi(k_jr) v_j^T / (phi(q_i)^T sum_j sum_r pi_r phi(k_jr) + eps),
    phi(x) = elu(x) + 1,                               causal: the same sums over j <= i

The r components of a token share its value, so the sums need one key feature a token, phi~(k_j) = sum_r pi_r
phi(k_jr): it is mha(linear) on (phi(q), phi~(k), v), run by the shared feature kernel (_kernelized.py: one [S z]
per K/V head bidirectional; chunks of 64 with the states of the earlier chunks causal; prefix sums exported; the
running [S z] when decoding). Choices where the paper is silent: phi = elu + 1 and eps = 1e-6 as mha(linear); pi =
softmax of the same r learned logits per K/V head as the softmax form, the r keys from the same projections; no
1 / sqrt(dh) and no sigma (a linear kernel has no temperature). Padded keys add nothing (phi~(k) zeroed); a left-
padded query with no key reads 0 / eps = 0. O(n r dh + n dh^2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...decode import slot
from . import _kernelized as kern

EPS = 1e-6


def features(m, x: torch.Tensor, ctx):
    """phi(q) [b, h, n, dh]; phi~(k) = sum_r pi_r phi(k_jr) [b, kv, n, dh] (padded keys 0); v [b, kv, n, dh]."""
    b, n, _ = x.shape
    kv, dh, r = m.kv_heads, m.head_dim, m.r
    # (elu keeps its input, not its output: +1 in place); the features laid out [b, h, n, dh] as the kernel reads them
    fq = F.elu(m.q_proj(x).view(b, n, m.heads, dh)).add_(1).transpose(1, 2).contiguous()
    k = m.k_proj(x).view(b, n, 1, kv, dh)
    if m.k_extra is not None:
        k = torch.cat((k, m.k_extra(x).view(b, n, r - 1, kv, dh)), 2)  # [b, n, r, kv, dh]
    pi = torch.softmax(m.mix_logit, -1).to(x.dtype).T[:, :, None]  # [r, kv, 1]
    fk = (F.elu(k).add_(1) * pi).sum(2).transpose(1, 2).contiguous()  # [b, kv, n, dh]
    del k
    key_mask = None if ctx is None else m.key_mask(ctx)
    if key_mask is not None:
        fk = fk * key_mask[:, None, :, None].to(fk.dtype)
    return fq, fk, m.v_proj(x).view(b, n, kv, dh).transpose(1, 2)


def linear_forward(m, x: torch.Tensor, ctx) -> torch.Tensor:
    return m.out(_attend(m, x, ctx))  # the features freed before o_proj


def _attend(m, x, ctx):
    fq, fk, v = features(m, x, ctx)
    if m.causal:
        o = kern.causal(fq, m.expand_kv(fk), m.expand_kv(v), m.chunk)
    else:
        o = kern.bidirectional(fq, fk, v, m.expand_kv)
    return o[..., :-1] / (o[..., -1:] + EPS)


def linear_step(m, x: torch.Tensor, ctx) -> torch.Tensor:
    """Decoding: the new tokens read the running [S z] = sum_j phi~(k_j) [v_j 1]^T ([dh, dh + 1] per K/V head) and
    each other causally; then [S z] takes them in."""
    fq, fk, v = features(m, x, None)
    b, kv, _, dh = fk.shape
    s = ctx.cache.caches.get(slot(ctx, m), fk.new_zeros(b, kv, dh, dh + 1))
    o, ctx.cache.caches[slot(ctx, m)] = kern.step(fq, fk, v, s, m.expand_kv)
    return m.out(o[..., :-1] / (o[..., -1:] + EPS))
