"""mha(fanet): FANet's fast attention (Hu, Perazzi, Heilbron, Wang, Lin, Saenko & Sclaroff 2020), per head

    o = (1/n) Q^ (K^^T V),     q^_i = q_i / ||q_i||,  k^_j = k_j / ||k_j||   (l2 norms over the dh channels)

the mean over the n keys of the cosine similarity q^_i . k^_j times v_j, computed right to left: K^^T V is a
[dh x dh] context per head, O(n dh^2), never n x n; no softmax and no 1/sqrt(dh). (The paper writes 1/n with n
the number of pixels: the similarities are averaged, not normalised per query.)

Causal form (ours; the paper's is bidirectional, for images): the same mean over the keys a query reads,
o_i = 1/(i + 1) sum_{j <= i} (q^_i . k^_j) v_j. It is well defined because the paper's 1/n counts keys, not a
data-dependent sum: a running state G_i = sum_{j <= i} k^_j v_j^T and the position give it, in chunks
(_rightproduct.py) or one token at a time. Padding: padded keys add nothing and n (causal: i + 1) counts the
real tokens. K/V heads (GQA) each keep one context. No position scheme (rope would turn q and k before the
norms: not in the paper).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cost import Cost, Symbols
from ..registry import Op, OpEnv, register
from ._common import AttentionParams, weightless_shape
from ._rightproduct import RightProductAttention, right_product_cost


class FastAttention(RightProductAttention):
    def features(self, q: torch.Tensor, k: torch.Tensor):
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1)

    def scale(self, count):
        return 1.0 / count


def fanet_cost(p: AttentionParams, env: OpEnv, s: Symbols) -> Cost:
    """The l2 norms of q and k, K^^T V and Q^ G (causal: in chunks); see right_product_cost."""
    return right_product_cost(p, env, s, normalized=True)


OP = register(Op(
    decode="the running sum G = sum_j k^_j v_j^T [dh x dh] per K/V head: constant in the tokens seen",
    family="mha", variant="fanet", params=AttentionParams, module=FastAttention,
    causal="yes", shape=weightless_shape("mha(fanet)"), cost=fanet_cost,
    paper="Real-time Semantic Segmentation with Fast Attention, Hu et al. 2020, arXiv:2007.03815",
    summary="(1/n) l2norm(Q) (l2norm(K)^T V): the mean cosine similarity times v; causal: 1/(i+1) over j <= i",
    note="",  # no note in the reference; CATALOG.md lists it from seed 002
))
