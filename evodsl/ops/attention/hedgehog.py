"""mha(hedgehog): Hedgehog, linear attention with a learned softmax feature map that mimics softmax attention (Zhang,
Bhatia, Kumbong, Re 2024, arXiv:2402.04347, section 4).

Per head, q_t = x_t W_Q, k_t = x_t W_K, v_t = x_t W_V, a trainable map per head (W: dh x f, f = feature_dim)

    phi(x) = [softmax(x W), softmax(-x W)]       (2 f features, each softmax over its f entries)
    o_t = sum_{j<=t} phi(q_t)^T phi(k_j) v_j / sum_{j<=t} phi(q_t)^T phi(k_j),       y_t = (o_t) W_O  (heads concatenated)

It runs chunked (_feature_linear.py over _chunked_linear.py: the state [S z], 2 f x (dh + 1) a head), decodes by the
recurrence and exports in the one-piece form. The paper's distillation loss (cross-entropy between these weights
and softmax attention's, the map trained to match them) is training, not the op: it is left out.
Choices where the paper is silent or leaves it to its code (HazyResearch/lolcats' HedgehogFeatureMap): queries and
keys have their own maps (lolcats' untied q and k kernels), each without a bias and initialised to the identity
(W = I_(dh x f), the paper's identity-like start); no 1/sqrt(dh) scale; feature_dim defaults to head_dim; no eps in
the denominator (every feature is positive: a real query has a positive one). Grouped K/V heads (kv_heads) share the
key projections and the key map (one a K/V head).
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ...decode import slot
from ..registry import Op, OpEnv, register
from ._common import AttentionBase, AttentionParams
from ._feature_linear import normalised
from ._hedgehog_cost import hedgehog_cost
from ._linear_recurrent import recurrent_shape


class HedgehogParams(AttentionParams):
    feature_dim: int | None = Field(None, ge=1, le=4096, description="f: the map's width (2 f features); "
                                                                    "default head_dim")
    chunk: int = Field(64, ge=1, le=4096, description="tokens a chunk of the chunked form")


def feature_map(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [b, h, n, dh], w [h, dh, f] -> [b, h, n, 2 f]: [softmax(x W), softmax(-x W)]."""
    z = x @ w
    return torch.cat((z.softmax(-1), (-z).softmax(-1)), -1)


class HedgehogAttention(AttentionBase):
    def __init__(self, p: HedgehogParams, env: OpEnv):
        super().__init__(p, env)
        f, dh = p.feature_dim or self.head_dim, self.head_dim
        eye = torch.eye(dh, f)
        self.q_map = nn.Parameter(eye.repeat(self.heads, 1, 1))
        self.k_map = nn.Parameter(eye.repeat(self.kv_heads, 1, 1))
        self.chunk = p.chunk

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        n = x.shape[1]
        cache = ctx.cache if ctx is not None else None
        q, k, v = self.qkv(x)
        fq, fk = feature_map(q, self.q_map), feature_map(k, self.k_map)
        mask = self.key_mask(ctx)
        if mask is not None:  # a padded position adds nothing to [S z]
            fk = fk * mask[:, None, :, None].to(fk.dtype)
        fk, v = self.expand_kv(fk), self.expand_kv(v)
        if cache is not None:
            key = slot(ctx, self)
            old = cache.caches.get(key)
            o, state = normalised(fq, fk, v, None if old is None else old[0], self.chunk, step=n == 1)
            cache.caches[key] = (state,)
        else:
            o, _ = normalised(fq, fk, v, None, self.chunk, symbolic=not isinstance(n, int))
        return self.out(o)


OP = register(Op(
    decode="the state [S z] (2 f x (dh + 1)) of every query head: constant in the tokens seen",
    family="mha", variant="hedgehog", params=HedgehogParams, module=HedgehogAttention,
    causal="yes", shape=recurrent_shape("mha(hedgehog)"), supports=frozenset(),
    paper="The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry, Zhang et al. 2024, "
          "arXiv:2402.04347",
    summary="phi(x) = [softmax(x W), softmax(-x W)] per head (W learned, identity init), normalised linear attention; "
            "causal only; chunked, O(n C f + n f dh)",
    cost=hedgehog_cost,
))
