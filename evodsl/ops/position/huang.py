"""pos(huang, method=1|2|3|4, k=16): the relative position embeddings of Huang et al. 2020 ("Improve Transformer
Models with Better Relative Position Embeddings", arXiv:2009.13658, §3.2), run inside every mha(softmax)
downstream; on the stream it is the identity. With q_i, k_j a head's query and key, δ = clip(j − i, k) =
max(−k, min(k, j − i)) and dh the head width, the score of query i for key j is

    method 1:  e_ij = (q_i·k_j) w_|δ| / sqrt(dh)                      w: k + 1 scalars per head (|j − i| clipped)
    method 2:  e_ij = (q_i·k_j) w_δ / sqrt(dh)                        w: 2k + 1 scalars per head (direction-aware)
    method 3:  e_ij = sum_c q_ic k_jc a_δc / sqrt(dh)                 a_δ in R^dh (the paper's sum_prod)
    method 4:  e_ij = ((q_i + a_δ)·(k_j + a_δ) − a_δ·a_δ) / sqrt(dh)  = (q_i·k_j + q_i·a_δ + a_δ·k_j) / sqrt(dh)

then softmax over j and the weighted sum of v_j, per head. Methods 1 to 3 multiply the position into q·k, so the
scores are formed explicitly (a [b, h, n, n] tensor, as the paper's O(n² d)); method 4 adds q·a + a·k, which is
SDPA's float mask (q A^T and k A^T against the 2k + 1 rows, gathered at δ). Method 3's trilinear sum is computed
without an [n, n, dh] tensor: for |j − i| >= k, a_{±k} is one vector, so (q ⊙ a_{±k}) k^T is one matmul each; the
2k − 1 offsets inside the band are a loop of [b, h, n, dh] products, q_i ⊙ k_{i+r}, times a_r, gathered into place.
Choices where the paper is silent:
- Each attention layer has its own table (the paper trains per layer; no table is shared upstream). Methods 1 and 2
  learn a scalar per head and distance; methods 3 and 4 one vector per distance shared by the heads (as Shaw et
  al.'s, which the paper extends), dh wide.
- Initialised so that the layer starts as plain attention where the method allows: w = 1 (methods 1, 2), a = 1
  (method 3); method 4's a ~ N(0, 0.02²).
- The paper's models are encoders; every term reads key j and the distance j − i only, so the causal mask keeps
  the future out exactly (causal form "yes"); the causal form computes only the offsets j − i <= 0. Decoding:
  the new queries (at their absolute positions) against every cached key.
Only mha(softmax) lists it (its explicit-score path; the banded and kernelized attentions have no place for a
multiplicative score). Padding: padded keys get no weight (the attention's mask).
"""
from __future__ import annotations

from pydantic import Field

from ..cost import Cost
from ..registry import Op, OpParams, register, sequence_shape
from ._huang_attention import HuangRelative
from ._inattention import InAttentionStream


class HuangParams(OpParams):
    method: int = Field(4, ge=1, le=4, description="1: (q·k) w_|δ|; 2: (q·k) w_δ; 3: sum q k a_δ; "
                                                   "4: (q + a_δ)·(k + a_δ) − a_δ·a_δ")
    k: int = Field(16, ge=1, le=4096, description="relative distances clipped to [-k, k]")


OP = register(Op(
    decode="the scores of the new queries against every cached key, at their distances",
    shape=sequence_shape, family="pos", variant="huang", params=HuangParams, module=InAttentionStream,
    causal="yes", attach=HuangRelative,
    attach_cost=lambda p, s, h, kv, dh: Cost(),  # its whole cost is the attention's (_huang_cost.py)
    cost=lambda p, env, s: Cost(inplace=True),  # the identity on the stream; each attention counts its table
    paper="Improve Transformer Models with Better Relative Position Embeddings, Huang et al. 2020, "
          "arXiv:2009.13658",
    summary="δ = clip(j − i, k): e_ij = (q·k) w_|δ| (1), (q·k) w_δ (2), Σ q k a_δ (3), (q + a_δ)·(k + a_δ) − |a_δ|² "
            "(4), over sqrt(dh)",
    note="Pe/005.md",
))
