"""pos(permute, r=null, seed=0): PermuteFormer's relative positions for kernelized attention (Chen 2021,
"PermuteFormer: Efficient Relative Position Encoding for Long Sequences", arXiv:2109.02377, §3), run inside every
mha(linear) and mha(performer) downstream; on the stream it is the identity.

Each head has a permutation P of its F feature channels (F = dh for mha(linear)'s elu + 1, the m random features
for mha(performer)), drawn once (seeded, a buffer). The features of the query at position i and the key at j
become r^i P^i phi(q_i) and r^(-j) P^j phi(k_j), so that

    (r^i P^i phi(q_i))·(r^(-j) P^j phi(k_j)) = r^(i-j) phi(q_i)^T P^(j-i) phi(k_j)      (P orthogonal)

depends on the positions only through i − j, and the attention stays linear: numerator and denominator are
sums over j of these weights times [v_j 1]. The i-th power is index arithmetic: P's cycles are listed once, and
P^i sends a channel c to the member (pos(c) + i) mod len(c) places along its cycle ([h, n, F] indices, never an
[n, F, F] matrix).
Causal: the decay r^(i−j) <= 1 (j <= i) runs as retention's decay (_chunked_linear.py: chunks of 64 tokens, the
ratios inside a chunk and the state decayed by r^C between chunks, so neither r^i nor r^(−j) is ever formed and
nothing overflows at any length); decoding carries the decayed state [F x (dv + 1)] per head, the new tokens'
features permuted at their absolute positions (offset..).
Bidirectional: r^(i−j) would grow without bound for keys after the query, so the bidirectional form is the
permutation alone (r = 1), as the authors' encoder (long_range_arena/models/*_prenorm.py) runs it.
Choices where the paper is silent, from the authors' code (language_model/permute/__init__.py):
- r per head, r_h = sigmoid(2 + 3h/H) (0.88 .. 0.99) by default; r= sets one value for every head (r=1: none).
- Each query head permutes its own copy of its K/V head's key features (grouped K/V heads share keys, not P).
- P is drawn from torch.Generator(seed) per head (torch.randperm), not from the model's seed: a saved model
  reproduces it from its buffer.
"""
from __future__ import annotations

from pydantic import Field

from ..cost import Cost
from ..registry import Op, OpParams, register, sequence_shape
from ._inattention import InAttentionStream
from ._permute_attention import PermuteRelative


class PermuteParams(OpParams):
    r: float | None = Field(None, gt=0.0, le=1.0, description="causal decay r^(i-j); default per head "
                                                              "sigmoid(2 + 3h/H), the authors'")
    seed: int = Field(0, ge=0, le=2 ** 62, description="the generator the permutations are drawn from")


OP = register(Op(
    decode="the state [F x (dv + 1)] per head, decayed by r a token; the new features permuted at their positions",
    shape=sequence_shape, family="pos", variant="permute", params=PermuteParams, module=InAttentionStream,
    causal="yes", attach=PermuteRelative,
    attach_cost=lambda p, s, h, kv, dh: Cost(),  # its whole cost is the attention's (_permute_cost.py)
    cost=lambda p, env, s: Cost(inplace=True),  # the identity on the stream
    paper="PermuteFormer: Efficient Relative Position Encoding for Long Sequences, Chen 2021, arXiv:2109.02377",
    summary="r^i P^i phi(q_i) · r^(-j) P^j phi(k_j) = r^(i-j) phi(q_i)^T P^(j-i) phi(k_j), a random permutation "
            "P per head; bidirectional: r = 1",
    note="Pe/007.md",
))
