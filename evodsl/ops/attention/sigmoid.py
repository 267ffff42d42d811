"""mha(sigmoid, seq=N): sigmoid attention (Ramapuram et al. 2024, Theory, Analysis, and Best Practices for Sigmoid
Self-Attention, eq. 2): softmax replaced by an elementwise sigmoid, no row normalisation,

    o_t = sum_j sigmoid(q_t . k_j / sqrt(dh) + b) v_j        per head,  b = -log(n)

The paper sets b = -log n, n the sequence length, so that the weights of a row start near the sum 1 of softmax's.
A causal or decoding call cannot read n from its input (the outputs at t would depend on the tokens after t), so n
is a fixed param, seq= (default 1024: the training length), and score_bias= sets b itself. The paper's hybrid-norm
(a norm on the attention's output) and LayerScale are outside the attention: norm and residual(..., scale=) ops of
the model, not of this op.

It runs a blocked kernel (_sigmoid_kernel.py; FlashSigmoid's scheme): query blocks of B positions against key
blocks of B, causal blocks above the diagonal skipped, so that the memory is O(n dh + B^2) per head and the causal
FLOPs are the lower triangle's blocks; its backward recomputes each block's weights from q, k, v (a custom autograd
Function): nothing n x n, forward or backward. The export (a symbolic n: no Python loop over blocks) computes the
dense form, every pair masked. Grouped K/V heads read K and V in place. Causal: keys up to the query; decoding keeps
K and V of every position. ALiBi's bias is added to the scores (the paper trains with ALiBi or rope: rope turns q
and k before the kernel). Padding: a padded key's weight is 0 (sigmoid(-inf)), so a padded batch equals each
sequence alone; a query without real keys (left padding) outputs 0. dropout= is refused (the kernel has none).
"""
from __future__ import annotations

import math

from pydantic import Field

from ...decode import append_kv
from ..registry import Op, OpEnv, is_symbolic, register
from ._common import AttentionBase, AttentionParams, score_bias
from ._sigmoid_cost import sigmoid_cost
from ._sigmoid_kernel import SigmoidAttention as SigmoidKernel, dense_sigmoid_attention
from .isab import no_dropout_shape


class SigmoidParams(AttentionParams):
    seq: int = Field(1024, ge=1, le=1 << 30, description="n of the default score bias b = -log(n): the training "
                                                         "length (fixed: a causal call must not read its own n)")
    score_bias: float | None = Field(None, ge=-1e4, le=1e4, description="b added to every score; default -log(seq)")
    block: int = Field(128, ge=1, le=1 << 16, description="B: the kernel's query and key blocks")


class SigmoidAttentionModule(AttentionBase):
    def __init__(self, p: SigmoidParams, env: OpEnv):
        super().__init__(p, env)
        self.score_bias = p.score_bias if p.score_bias is not None else -math.log(p.seq)
        self.block = p.block
        self.adds_bias = score_bias(env)

    def attend(self, q, k, v, keep, start: int = 0):
        scale = 1.0 / math.sqrt(self.head_dim)
        slopes = self.pos.slopes if self.adds_bias else None  # ALiBi's -m |i - j|, evaluated block by block
        if is_symbolic(q) or not isinstance(q.shape[2], int):
            return dense_sigmoid_attention(q, k, v, keep, scale, self.score_bias, self.causal, start, slopes)
        return SigmoidKernel.apply(q, k, v, keep, scale, self.score_bias, self.block, self.causal, start, slopes)

    def forward(self, x, ctx):
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        q, k, v = self.qkv(x)
        return self.out(self.attend(q, k, v, self.key_mask(ctx)))

    def _step(self, x, ctx):
        """Decoding: the new queries (positions offset..) against the cached K, V and their own."""
        start = ctx.offset
        q, k, v = self.qkv(x, start)
        k, v = append_kv(ctx, self, k, v)
        return self.out(self.attend(q, k, v, None, start))


OP = register(Op(
    decode="a K/V cache of every position so far (kv_heads heads)",
    family="mha", variant="sigmoid", params=SigmoidParams, module=SigmoidAttentionModule,
    causal="yes", shape=no_dropout_shape("mha(sigmoid)"), supports=frozenset({"rope", "xpos", "alibi"}),
    paper="Theory, Analysis, and Best Practices for Sigmoid Self-Attention, Ramapuram et al. 2024, arXiv:2409.04431",
    summary="sigmoid(Q K^T / sqrt(dh) + b) V per head, no row normalisation, b = -log(seq) (or score_bias); a "
            "blocked kernel, its backward recomputing the weights: O(n^2 d) time, O(n d) memory",
    note="", cost=sigmoid_cost,
))
