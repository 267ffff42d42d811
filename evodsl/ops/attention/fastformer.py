"""mha(fastformer): Fastformer's additive attention (Wu, Wu, Qi, Huang & Xie 2021), O(n d).

Per head, with q_i, k_i, v_i the projections of position i (dh channels) and learned w_q, w_k in R^dh:

    alpha_i = softmax_i(w_q . q_i / sqrt(dh)),   q = sum_i alpha_i q_i          (the global query)
    p_i = q * k_i,   beta_i = softmax_i(w_k . p_i / sqrt(dh)),   k = sum_i beta_i p_i   (the global key)
    u_i = k * v_i,   o_i = W_r u_i + q_i                                          (then o_proj)

(* elementwise; W_r a learned [h dh, h dh] transform, the paper's output "linear transformation" added to the
query). The scores are per head, as the paper writes them (its code scores every head from all heads' channels).
Every position reads the global vectors pooled over all positions: no causal form. Padding: padded positions
take no part in either pooling, so a padded batch equals each sequence alone. No attention weights to drop out.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ..cost import Cost, Symbols, linear
from ..registry import Op, OpEnv, register
from ._common import AttentionBase, AttentionParams, attention_cost, head_symbols, weightless_shape


class FastformerParams(AttentionParams):
    bias: bool = Field(True, description="biases on the projections and the transform W_r")




class FastformerAttention(AttentionBase):
    def __init__(self, p: FastformerParams, env: OpEnv):
        super().__init__(p, env)
        D = self.heads * self.head_dim
        self.w_q = nn.Parameter(torch.empty(self.heads, self.head_dim).normal_(0.0, self.head_dim ** -0.5))
        self.w_k = nn.Parameter(torch.empty(self.heads, self.head_dim).normal_(0.0, self.head_dim ** -0.5))
        self.transform = nn.Linear(D, D, bias=p.bias)

    def _pool(self, x: torch.Tensor, w: torch.Tensor, mask) -> torch.Tensor:
        """sum_i softmax_i(w . x_i / sqrt(dh)) x_i over the real positions: [b, h, n, dh] -> [b, h, 1, dh]."""
        s = (x * w[:, None, :]).sum(-1) * self.head_dim ** -0.5  # [b, h, n]
        if mask is not None:
            s = s.masked_fill(~mask[:, None, :], float("-inf"))
        return (s.softmax(-1).unsqueeze(-1) * x).sum(2, keepdim=True)

    def forward(self, x, ctx):
        q, k, v = self.qkv(x)
        k, v = self.expand_kv(k), self.expand_kv(v)
        mask = ctx.mask if ctx is not None else None
        p = self._pool(q, self.w_q, mask) * k  # p_i = q * k_i
        u = self._pool(p, self.w_k, mask) * v  # u_i = k * v_i
        b, h, n, dh = u.shape
        o = self.transform(u.transpose(1, 2).reshape(b, n, h * dh)) + q.transpose(1, 2).reshape(b, n, h * dh)
        return self.o_proj(o)


def fastformer_cost(p: FastformerParams, env: OpEnv, s: Symbols) -> Cost:
    """Two poolings and two elementwise products over [b, h, n, dh], the transform W_r (a linear on every
    position); no n x n term."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    D = h * dh
    q, out = b * n * D * by, b * n * s.d * by
    e = b * n * D  # elements of one [b, h, n, dh] tensor
    transform = linear(s, D, D, p.bias)
    core = Cost(params=2 * D + transform.params, fwd=transform.fwd, bwd=transform.bwd,
                fwd_other=12 * e, bwd_other=24 * e + transform.bwd_other)
    pooled = b * h * n * by  # one [b, h, n] set of pooling weights
    # kept: q, k, v at h heads (grouped K/V heads are repeated, the originals then freed), p, the transform's and
    # o_proj's inputs, and the two poolings' weights
    saved = 6 * q + 2 * pooled
    phases = [6 * q + out]  # six [b, n, h dh] tensors at the peak (q, k, v at h heads, p, u, the transform's input)
    bwd = [2 * q + pooled]  # a product's gradient beside the pooled one
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=0, bwd_phases=bwd)


OP = register(Op(
    decode=None,  # bidirectional only: the global query and key pool every position
    family="mha", variant="fastformer", params=FastformerParams, module=FastformerAttention,
    causal="no", shape=weightless_shape("mha(fastformer)"), cost=fastformer_cost,
    paper="Fastformer: Additive Attention Can Be All You Need, Wu et al. 2021, arXiv:2108.09084",
    summary="global query q = sum softmax(w_q.q_i) q_i, global key k = sum softmax(w_k.(q*k_i)) (q*k_i), "
            "o_i = W_r (k * v_i) + q_i; O(n d)",
    note="",  # no note in the reference; CATALOG.md lists it
))
