"""mha(simpletron): SimpleTRON (Yorsh, Kovalenko, Vancura, Vasata, Kordik & Mikolov 2021), per head

    o = (1/sqrt(n)) Q (K^T V)

dot-product attention with the softmax (and the 1/sqrt(dh)) taken out, computed right to left: K^T V is a
[dh x dh] context per head, O(n dh^2), never n x n; no feature map, no normaliser but the 1/sqrt(n) (the
reference note MHA/RightProduct/007.md). It is not mha(linear, phi=none): linear attention divides by
phi(q_i)^T sum_j phi(k_j), which without a positive phi can vanish; SimpleTRON has no such denominator.

Causal form (ours; the paper's experiments are bidirectional): o_i = (1/sqrt(i + 1)) q_i^T sum_{j <= i} k_j v_j^T,
the scale counting the keys a query reads as 1/sqrt(n) counts all of them: a running state and the position
(_rightproduct.py, in chunks, or one token at a time). Padding: padded keys add nothing and n (causal: i + 1)
counts the real tokens. K/V heads (GQA) each keep one context. No position scheme (none in the paper).
"""
from __future__ import annotations

from ..cost import Cost, Symbols
from ..registry import Op, OpEnv, register
from ._common import AttentionParams, weightless_shape
from ._rightproduct import RightProductAttention, right_product_cost


class SimpleTRONAttention(RightProductAttention):
    def scale(self, count):
        return count ** -0.5


def simpletron_cost(p: AttentionParams, env: OpEnv, s: Symbols) -> Cost:
    """K^T V and Q G (causal: in chunks); see right_product_cost."""
    return right_product_cost(p, env, s, normalized=False)


OP = register(Op(
    decode="the running sum G = sum_j k_j v_j^T [dh x dh] per K/V head: constant in the tokens seen",
    family="mha", variant="simpletron", params=AttentionParams, module=SimpleTRONAttention,
    causal="yes", shape=weightless_shape("mha(simpletron)"), cost=simpletron_cost,
    paper="SimpleTRON: Simple Transformer with O(N) Complexity, Yorsh et al. 2021, arXiv:2111.15588",
    summary="(1/sqrt(n)) Q (K^T V): no feature map, no softmax; causal: 1/sqrt(i+1) over j <= i",
    note="MHA/RightProduct/007.md",
))
