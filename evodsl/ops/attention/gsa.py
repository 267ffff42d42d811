"""mha(gsa, slots): Gated Slot Attention (Zhang, Yang, Zhu, Zhang, Cui, Wang, Wang, Shi, Wang, Bi, Zhou, Fu 2024,
arXiv:2409.07146, section 3), as fla's GatedSlotAttention layer wires it.

Per head, with m slots, q_t = swish(x_t W_Q), k_t = swish(x_t W_K), v_t = swish(x_t W_V), and a forget gate per slot

    alpha_t = sigmoid(x_t W_f)^(1/8)                                        [m]  (log alpha = logsigmoid / 8)
    K~_t = diag(alpha_t) K~_(t-1) + (1 - alpha_t) k_t^T                     [m, dk]  (the slot keys)
    V~_t = diag(alpha_t) V~_(t-1) + (1 - alpha_t) v_t^T                     [m, dv]  (the slot values)
    o_t = V~_t^T softmax(K~_t q_t)
    y_t = RMSNorm(swish(o_t)) W_O                                           (the norm over all heads' channels)

i.e. two passes of GLA over the slots: the slot scores K~_t q_t are a GLA with queries q, keys k and "values" the
slot writes 1 - alpha_t, its decay on the value side (_gsa_kernel.py); softmax over the slots; then a GLA with queries
the softmaxed scores, keys the slot writes and values v, its decay on the key side (_chunked_linear.py's
chunked_decay). It runs chunked (a loop over chunks only), decodes by the two recurrences (the state: K~ and V~,
m x (dk + dv) a query head, constant in the tokens seen) and exports in the one-piece parallel form of both passes
([n, n, m] decay ratios: a symbolic n only; tests/test_onnx.py OTHER_FORMS). Causal only: the paper gives no
bidirectional form.
Choices where the paper is silent, or as fla's layer (gate_logit_normalizer 8, feature map swish, no output gate,
no short convolution, use_norm): the scores carry no 1/sqrt(dk) (fla's layer passes scale=1); v also goes through
swish (fla's); the norm is one RMSNorm over the h dv output channels with a learned scale (fla's g_norm over the
hidden size) applied to swish(o); the gate projection W_f has no bias and gives kv_heads x m gates (fla's f_proj),
shared by the query heads of a K/V group, as the keys and values are; each query head keeps its own slot state.
Keys and values are as wide as the heads. Chunks of 16 by default; any gate is exact (a chunk whose decay is
too fast for the factorisation exp(B_i) exp(-B_j) takes the ratios one lag at a time, in both passes).
Padding: a padded position writes nothing (its slot write 1 - alpha is zeroed) and decays nothing (alpha = 1
there), so either side pads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...decode import slot
from ..registry import Op, OpEnv, register
from ._chunked_linear import chunked_decay, parallel_decay, recurrent_decay
from ._common import AttentionBase, AttentionParams
from ._gsa_cost import gsa_cost
from ._gsa_kernel import chunked_slot_decay, parallel_slot_decay, recurrent_slot_decay
from ._linear_recurrent import recurrent_shape


class GSAParams(AttentionParams):
    slots: int = Field(64, ge=1, le=4096, description="m: memory slots a head")
    normalizer: float = Field(8.0, gt=0.0,
                              description="the gate's temperature: log alpha = logsigmoid(x W_f) / normalizer")
    chunk: int = Field(16, ge=1, le=4096, description="tokens a chunk of the chunked form (the result is the same)")


class GatedSlotAttention(AttentionBase):
    def __init__(self, p: GSAParams, env: OpEnv):
        super().__init__(p, env)
        self.slots, self.normalizer, self.chunk, self.eps = p.slots, p.normalizer, p.chunk, 1e-5
        self.f_proj = nn.Linear(env.d, self.kv_heads * p.slots, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(self.heads * self.head_dim))

    def features(self, x, ctx=None):
        """q, k [b, h, n, dk], v [b, h, n, dv], the slot writes s = 1 - alpha and log alpha g [b, h, n, m]."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x)
        g = F.logsigmoid(self.f_proj(x)).view(b, n, self.kv_heads, self.slots).transpose(1, 2) / self.normalizer
        mask = self.key_mask(ctx)
        if mask is not None:  # a padded position writes nothing and decays nothing
            g = g * mask[:, None, :, None].to(g.dtype)
        s = -torch.expm1(g)
        k, v, g, s = (self.expand_kv(t) for t in (F.silu(k), F.silu(v), g, s))
        return F.silu(q), k, v.contiguous(), s, g

    def finish(self, o):
        b, h, n, dv = o.shape
        o = F.silu(o).transpose(1, 2).reshape(b, n, h * dv)
        return self.o_proj(o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        cache = ctx.cache if ctx is not None else None
        q, k, v, s, g = self.features(x, ctx)
        if cache is not None:
            key = slot(ctx, self)
            old = cache.caches.get(key)
            first, second = (None, None) if old is None else old
            if x.shape[1] == 1:
                scores, first = recurrent_slot_decay(q, k, s, g, first)
                o, second = recurrent_decay(scores.softmax(-1), s, v, g, second)
            else:
                scores, first = chunked_slot_decay(q, k, s, g, first, self.chunk)
                o, second = chunked_decay(scores.softmax(-1), s, v, g, second, self.chunk)
            cache.caches[key] = (first, second)
        elif not isinstance(x.shape[1], int):
            o = parallel_decay(parallel_slot_decay(q, k, s, g).softmax(-1), s, v, g)
        else:
            scores, _ = chunked_slot_decay(q, k, s, g, None, self.chunk)
            o, _ = chunked_decay(scores.softmax(-1), s, v, g, None, self.chunk)
        return self.finish(o)


OP = register(Op(
    decode="the slot keys K~ (m x dk) and slot values V~ (m x dv) of every query head: constant in the tokens seen",
    family="mha", variant="gsa", params=GSAParams, module=GatedSlotAttention,
    causal="yes", shape=recurrent_shape("mha(gsa)"), supports=frozenset(),
    paper="Gated Slot Attention for Efficient Linear-Time Sequence Modeling, Zhang et al. 2024, arXiv:2409.07146",
    summary="K~_t = diag(alpha_t) K~_(t-1) + (1 - alpha_t) k_t^T, V~_t likewise with v_t, "
            "o_t = V~_t^T softmax(K~_t q_t), alpha_t = sigmoid(x W_f)^(1/8) over m slots; swish q, k, v; "
            "RMSNorm(swish(o)); causal only; two chunked GLA passes, O(n C (d + m h) + n m d)",
    cost=gsa_cost,
))
