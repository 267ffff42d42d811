"""mha(mgk, components=r, form=softmax|linear): Transformer with a Mixture of Gaussian Keys (Nguyen et al. 2022,
Improving Transformers with Probabilistic Attention Keys, arXiv:2110.08678), its softmax form (Transformer-MGK).

Softmax attention reads q_i . k_j as the log-likelihood of q_i under a Gaussian centred at k_j. MGK makes each key a
mixture of r Gaussians, k_j1 .. k_jr (r key projections), with mixing weights pi_r and one variance sigma^2:

    a_ij = sum_r pi_r exp(-|q_i - k_jr|^2 / 2 sigma^2) / sum_j' sum_r pi_r exp(-|q_i - k_j'r|^2 / 2 sigma^2),
    o_i = sum_j a_ij v_j

Choices where the paper leaves them to the model: sigma^2 = sqrt(dh) in every head (softmax attention's
temperature: with r = 1 and keys of one norm, a is softmax attention); pi = softmax of r learned logits per K/V
head (the paper's pi_jr, which its code shares across positions, so that any n works); the r keys of a token come
from r key projections of the input (k_proj and k_extra); one value a token. Under grouped K/V heads (kv_heads <
heads) the r keys and pi belong to the K/V head, shared by its group of query heads.

How it runs: exp(-|q - k|^2 / 2 sigma^2) = exp(-|q|^2 / 2 sigma^2) exp((q . k - |k|^2 / 2) / sigma^2), and the
first factor is the same for every key of a query, so softmax drops it. The weights are then one softmax over the
n r (token, component) pairs with scores q_i . k_jr / sigma^2 + log pi_r - |k_jr|^2 / 2 sigma^2, each pair's value
v_j: one F.scaled_dot_product_attention call over q' = [q, 1] and k'_jr = [k_jr, sigma^2 log pi_r - |k_jr|^2 / 2]
(width dh + 1, scale 1 / sigma^2; v zero-padded to the width), keys laid out token by token (pair j r + c). No
n x n r weights are formed (the fused kernel). A causal model runs is_causal over the queries repeated r times:
query i at row i r + r - 1 reads exactly pairs 0 .. i r + r - 1, its tokens' all, the other rows dropped (r times
the query rows instead of an [n, n r] mask: no n x n tensor, memory linear in n). A padded batch passes the padding
mask (and the causal one) repeated r times (left padding: a query with no key reads its own, as mha(softmax)).
O(n^2 r d), causal O(n^2 r^2 d). Decoding keeps the K cache (r keys a token) and the V cache. No position
scheme inside; dropout= is refused (the fused kernel never forms the weights). form=linear: the paper's linear form
(phi(q)^T sum_j sum_r pi_r phi(k_jr) v_j^T, normalised), O(n r dh + n dh^2), causal by prefix sums: _mgk_linear.py.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...decode import slot
from ..registry import Op, OpEnv, register
from ._common import AttentionBase, AttentionParams
from ._mgk_cost import mgk_cost
from ._mgk_linear import linear_forward, linear_step
from .isab import no_dropout_shape


class MgkParams(AttentionParams):
    components: int = Field(2, ge=1, le=64, description="r: Gaussians (keys) in each key's mixture")
    form: Literal["softmax", "linear"] = Field("softmax", description="softmax: the Gaussian kernel (O(n^2)); linear: "
                                               "elu + 1 features, the mixture of key features (O(n))")


class MixtureOfGaussianKeysAttention(AttentionBase):
    chunk = 64  # form=linear: tokens per chunk of the causal form

    def __init__(self, p: MgkParams, env: OpEnv):
        super().__init__(p, env)
        self.r, self.form = p.components, p.form
        width = self.kv_heads * self.head_dim
        self.k_extra = nn.Linear(env.d, (self.r - 1) * width, bias=p.bias) if self.r > 1 else None  # keys 2 .. r
        self.mix_logit = nn.Parameter(torch.zeros(self.kv_heads, self.r))  # pi = softmax over the r components

    def project(self, x: torch.Tensor):
        """q' [b, h, n, dh + 1]; k' [b, kv, n r, dh + 1] (pair j r + c); v' [b, kv, n, dh + 1] (a zero column)."""
        b, n, _ = x.shape
        kv, dh, r = self.kv_heads, self.head_dim, self.r
        q = self.q_proj(x).view(b, n, self.heads, dh)
        k = self.k_proj(x).view(b, n, 1, kv, dh)
        if self.k_extra is not None:
            k = torch.cat((k, self.k_extra(x).view(b, n, r - 1, kv, dh)), 2)  # [b, n, r, kv, dh]
        k = k.permute(0, 3, 1, 2, 4)  # [b, kv, n, r, dh]
        log_pi = torch.log_softmax(self.mix_logit, -1)[None, :, None, :, None]  # [1, kv, 1, r, 1]
        col = math.sqrt(dh) * log_pi - 0.5 * (k * k).sum(-1, keepdim=True)
        k = torch.cat((k, col.to(k.dtype)), -1).reshape(b, kv, n * r, dh + 1)  # (autocast: log pi is float32)
        q = F.pad(q, (0, 1), value=1.0).transpose(1, 2)
        v = F.pad(self.v_proj(x).view(b, n, kv, dh), (0, 1)).transpose(1, 2)
        return q, k, v

    def attend(self, q, k, v, keep, causal=False):
        """SDPA over the pairs, v' repeated r times (pair j r + c's value is v_j). causal: is_causal over the queries
        repeated r times, query i at row i r + r - 1 (which reads pairs 0 .. i r + r - 1, its tokens' all), the
        other rows dropped."""
        r = self.r
        if causal and r > 1:
            q = q.repeat_interleave(r, dim=2)
        o = F.scaled_dot_product_attention(q, k, v.repeat_interleave(r, dim=2), attn_mask=keep, is_causal=causal,
                                           scale=1 / math.sqrt(self.head_dim), enable_gqa=self.kv_heads != self.heads)
        if causal and r > 1:
            o = o[:, :, r - 1::r]
        return self.out(o[..., :self.head_dim])

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        if ctx is not None and ctx.cache is not None:
            return linear_step(self, x, ctx) if self.form == "linear" else self._step(x, ctx)
        if self.form == "linear":
            return linear_forward(self, x, ctx)
        n = x.shape[1]
        q, k, v = self.project(x)
        keep = self.allowed(ctx, n, x.device)  # [b, 1, n, n]: padding (and causal), or None
        if keep is not None:
            keep = keep.repeat_interleave(self.r, dim=-1)
        return self.attend(q, k, v, keep, causal=self.causal and keep is None)

    def readable(self, start, T, N, device) -> torch.Tensor:
        """bool [T, N r]: query start + i reads the pairs of tokens j <= start + i."""
        token = torch.div(torch.arange(N * self.r, device=device), self.r, rounding_mode="floor")
        return token[None, :] <= torch.arange(start, start + T, device=device)[:, None]

    def _step(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """Decoding: the new queries against the cached k', v' (r pairs a token) and their own."""
        q, k, v = self.project(x)
        old = ctx.cache.caches.get(slot(ctx, self))
        if old is not None:
            k, v = torch.cat((old[0], k), 2), torch.cat((old[1], v), 2)
        ctx.cache.caches[slot(ctx, self)] = (k, v)  # k' [b, kv, N r, dh + 1], v' [b, kv, N, dh + 1]
        N, T = v.shape[2], x.shape[1]
        return self.attend(q, k, v, self.readable(N - T, T, N, x.device))


OP = register(Op(
    decode="the K cache (r keys a token, with their mixture column) and the V cache (kv_heads heads); form=linear: the "
           "running sums [S z] [dh, dh + 1] per K/V head",
    family="mha", variant="mgk", params=MgkParams, module=MixtureOfGaussianKeysAttention,
    causal="yes", shape=no_dropout_shape("mha(mgk)"), supports=frozenset(),
    paper="Improving Transformers with Probabilistic Attention Keys (Transformer-MGK), Nguyen et al. 2022, "
          "arXiv:2110.08678",
    summary="softmax over the n r (token, component) pairs of sum_r pi_r exp(-|q_i - k_jr|^2 / 2 sigma^2), sigma^2 = "
            "sqrt(dh), pi learned per K/V head; one fused SDPA over [q, 1].[k_jr, sigma^2 log pi_r - |k_jr|^2/2]; "
            "O(n^2 r d); form=linear: phi(q)^T sum_j sum_r pi_r phi(k_jr) v_j^T normalised, phi = elu + 1, O(n d^2)",
    note="Softmax/001.md", cost=mgk_cost,
))
