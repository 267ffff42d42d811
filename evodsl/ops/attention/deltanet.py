"""mha(deltanet): DeltaNet, linear attention with the delta rule, trained in parallel over the sequence (Yang, Wang,
Zhang, Shen, Kim 2024, arXiv:2406.06484; the delta rule of Schlag, Irie, Schmidhuber 2021, arXiv:2102.11174).

Per head, with k_t L2-normalised and beta_t = sigmoid(x_t W_beta) in (0, 1) (the state transposed from the paper's
S_t = S_(t-1) (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, so that o_t = q_t^T S_t):

    S_t = (I - beta_t k_t k_t^T) S_(t-1) + beta_t k_t v_t^T,        o_t = q_t^T S_t

It runs as the chunked WY / UT form (section 3; _chunked_delta.py: one unit lower-triangular solve per chunk for all
chunks at once, a loop over chunks carrying the state), decodes by the recurrence (the state, dk x dv a head, and the
short convolutions' last K - 1 inputs) and exports in one piece (a chunk as long as the sequence, the triangular
inverse as a product of 16 factors; a symbolic n only). The layer around it is fla's DeltaNet layer (_delta_layer.py:
short convolutions with SiLU on q, k, v, L2-normalised q and k, q scaled by 1/sqrt(dk), an RMSNorm per head; fla's
default, no output gate). Where the paper is silent: values as wide as the heads; grouped K/V heads (kv_heads) share
the key and value projections and convolutions, each query head keeps its own beta and state; conv=0 drops the
convolutions (SiLU on the projections then, as fla's without them).
"""
from __future__ import annotations

from ..registry import Op, register
from ._delta_layer import DeltaLayer, DeltaParams
from ._linear_recurrent import recurrent_shape
from ._recurrent_cost import delta_cost


class DeltaNetParams(DeltaParams):
    pass


class DeltaNetAttention(DeltaLayer):
    pass


OP = register(Op(
    decode="the state S (dk x dv) of every query head and the short convolutions' last K - 1 inputs: constant in "
           "the tokens seen",
    family="mha", variant="deltanet", params=DeltaNetParams, module=DeltaNetAttention,
    causal="yes", shape=recurrent_shape("mha(deltanet)"), supports=frozenset(),
    paper="Parallelizing Linear Transformers with the Delta Rule over Sequence Length, Yang et al. 2024, "
          "arXiv:2406.06484",
    summary="S_t = (I - beta_t k_t k_t^T) S_(t-1) + beta_t k_t v_t^T, o_t = q_t^T S_t, k l2-normalised, beta = "
            "sigmoid; short convolutions, RMSNorm per head; causal only; chunked (WY), O(n C d + n d dh)",
    cost=delta_cost,
))
