"""pos(none): no position information at all, stated explicitly: NoPE (Haviv et al. 2022, "Transformer Language
Models without Positional Encodings Still Learn Positional Information", arXiv:2203.16634).

The identity on the stream, and nothing inside attention: a model with no pos op is the same model; this op lets
a spec say so (and `evodsl diff` show it). The paper's finding is for causal language models: the causal mask
alone lets the layers infer position (a token can count what it attends to). A bidirectional model without
positions is permutation-equivariant and cannot tell order, so pos(none) refuses one (drop it to build a bag of
tokens on purpose).
"""
from __future__ import annotations

from ..cost import Cost
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register, sequence_shape
from ._inattention import InAttentionStream


class NoPositionParams(OpParams):
    pass


def _shape(p: NoPositionParams, env: OpEnv):
    sequence_shape(p, env)
    if not env.causal:
        raise ShapeProblem("pos(none) in a bidirectional model: without positions every token sees the same set "
                           "of keys, so the model cannot tell their order (NoPE relies on the causal mask)", "",
                           "make the model causal, give it a position scheme, or drop pos(none)")
    return env.shape


OP = register(Op(
    decode="nothing to carry",
    shape=_shape, family="pos", variant="none", params=NoPositionParams, module=InAttentionStream, causal="yes",
    cost=lambda p, env, s: Cost(inplace=True),  # the identity: free
    paper="Transformer Language Models without Positional Encodings Still Learn Positional Information, Haviv "
          "et al. 2022, arXiv:2203.16634",
    summary="no position information (NoPE): the identity; causal models only, where the mask conveys order",
    note="Pe/011.md",
))
