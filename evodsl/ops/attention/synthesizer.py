"""mha(synthesizer, kind=..., max_len=L): Synthesizer (Tay et al. 2020, arXiv:2005.00743): attention weights
synthesized without token-token dot products, per head

    O = softmax(S) V,   V = x W_V  (kv_heads heads, each serving heads / kv_heads query heads),   out = O W_O

with the logits S [n, n] of one of the paper's kinds (sec. 3; the max_len L tables cut to their first n rows and
columns, n <= L: E410 beyond):
- dense (3.1): S_i = F(x_i) = W2 relu(W1 x_i + b1) + b2, the logits of token i over the L positions, cut to n.
  W1 [hidden, d] is shared by the heads and W2 [L, hidden] is per head (the paper writes F for one head); the cut
  is applied to W2's rows before the matmul, so the work is n^2 hidden, not n L hidden.
- random (3.2): S = R, a [L, L] table per head, learned, or fixed at its random initialisation (trainable=false:
  a buffer, the paper's fixed random synthesizer).
- factorized_dense (3.3): A = W_A relu(W1 x_i + b1) in R^a, B = W_B relu(..) in R^(L/a), a = factors (a divisor
  of L, default the largest one <= sqrt(L)); S_ij = A_{j div (L/a)} B_{j mod (L/a)}: A's entries repeated L/a
  times each, B tiled a times (the paper's H_A, H_B; which one repeats and which tiles it leaves open).
- factorized_random (3.4): S = R1 R2^T, R1, R2 [L, rank] per head.
- mixture (3.5): S = sum_c alpha_c S_c, alpha = softmax of learned logits per head (sum 1, as the paper asks),
  over the components of `mix` (the paper's combinations: random + vanilla, dense + vanilla, ...); vanilla is
  q k^T / sqrt(dh) with the q, k projections (kv_heads K heads).
Causal (the paper's LM experiments): logits of keys after the query are masked before the softmax; decoding keeps
V (and, with vanilla, K); row t's logits need only token t (dense) or position t (random). No scaling of the
synthetic logits (the paper has none). The tables are indexed by absolute position, so padding must come after
the tokens (left padding: E409); padded keys get no weight. No position scheme, no dropout on the weights.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ...decode import slot
from ...diagnostics import Diagnostic, EvoError
from ..registry import Op, OpEnv, ShapeProblem, register, require_right_padding
from ._common import AttentionBase, AttentionParams
from ._synthesizer_cost import synthesizer_cost
from ._synthesizer_logits import KINDS, MIXES, SyntheticLogits, components, factors
from .isab import no_dropout_shape

_ONLY = {"hidden": ("dense", "factorized_dense"), "factors": ("factorized_dense",), "rank": ("factorized_random",),
         "trainable": ("random",), "mix": ()}


class SynthesizerParams(AttentionParams):
    kind: Literal["dense", "random", "factorized_dense", "factorized_random", "mixture"] = Field(
        "dense", description="how the logits are synthesized (the paper's five kinds)")
    max_len: int = Field(512, ge=1, le=1 << 16, description="L: the longest sequence (the tables' rows and columns)")
    hidden: int | None = Field(None, ge=1, le=1 << 16, description="dense kinds: width of relu(W1 x); default d")
    factors: int | None = Field(None, ge=1, le=1 << 16, description="factorized_dense: a (a divisor of max_len)")
    rank: int = Field(8, ge=1, le=1 << 16, description="factorized_random: k, the rank of R1 R2^T")
    trainable: bool = Field(True, description="random: the table is learned (false: fixed at its initialisation)")
    mix: Literal[tuple(MIXES)] = Field("random_vanilla", description="mixture: its components")


def synthesizer_shape(p: SynthesizerParams, env: OpEnv):
    shape = no_dropout_shape("mha(synthesizer)")(p, env)
    kinds = components(p)
    for f in p.model_fields_set & set(_ONLY):
        if not set(_ONLY[f]) & set(kinds) and not (f == "mix" and p.kind == "mixture"):
            raise ShapeProblem(f"{f}= is for kind={' or '.join(_ONLY[f]) or 'mixture'}, not kind={p.kind}", f,
                               f"remove {f}=, or choose that kind")
    if "factorized_dense" in kinds and p.max_len % factors(p):
        raise ShapeProblem(f"factors={p.factors} does not divide max_len={p.max_len}", "factors",
                           "a b = max_len: choose a divisor of max_len")
    n = shape[1]
    if isinstance(n, int) and n > p.max_len:
        raise ShapeProblem(f"the stream has {n} positions, more than max_len={p.max_len}", "max_len",
                           f"the synthesized logits cover max_len positions: set max_len >= {n}")
    return shape


class SynthesizerAttention(AttentionBase):
    def __init__(self, p: SynthesizerParams, env: OpEnv):
        super().__init__(p, env)
        self.kinds, self.max_len = components(p), p.max_len
        if "vanilla" not in self.kinds:  # the synthetic kinds read no queries or keys
            del self.q_proj, self.k_proj
        self.synth = SyntheticLogits([k for k in self.kinds if k in KINDS], env.d, self.heads,
                                     p.model_copy(update={"factors": factors(p)}) if p.kind != "mixture" else p)
        self.mix = nn.Parameter(torch.zeros(self.heads, len(self.kinds))) if p.kind == "mixture" else None

    def forward(self, x, ctx):
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        n = x.shape[1]
        self._check_len(n)
        key_mask = self.key_mask(ctx)
        require_right_padding(key_mask, "mha(synthesizer)", "its logits are indexed by absolute position, and left "
                                                            "padding moves the tokens")
        q, k, v = self._project(x)
        return self.out(self.attend(x, q, k, v, 0, n, key_mask))

    def _check_len(self, n):
        if isinstance(n, int) and n > self.max_len:
            raise EvoError([Diagnostic("E410", f"mha(synthesizer) has max_len={self.max_len}, the input {n} positions",
                                       help="set max_len to the longest sequence")])

    def _project(self, x):
        """q [b, h, n, dh] and k [b, kv, n, dh] (vanilla only, else None), v [b, kv, n, dh]."""
        b, n, _ = x.shape
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        if "vanilla" not in self.kinds:
            return None, None, v
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        return q, self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2), v

    def attend(self, x, q, k, v, p0, T, key_mask):
        """softmax(S) V for the query rows p0 .. T-1 (x: their tokens) against the keys 0 .. T-1."""
        hid = self.synth.hidden(x)
        alpha = self.mix.softmax(-1)[:, :, None, None] if self.mix is not None else None
        s = None
        for c, kind in enumerate(self.kinds):
            if kind == "vanilla":
                part = q @ self.expand_kv(k).transpose(-1, -2) * (1.0 / math.sqrt(self.head_dim))
            else:
                part = self.synth.logits(kind, x, hid, p0, T)
            if alpha is not None:
                part = part * alpha[:, c]
            s = part if s is None else s + part
            del part
        del hid
        if self.causal:
            i = torch.arange(p0, T, device=x.device)[:, None]
            s = s.masked_fill(torch.arange(T, device=x.device)[None, :] > i, float("-inf"))
        if key_mask is not None:
            s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        w = s.softmax(-1)
        del s
        b = v.shape[0]
        if w.shape[0] == 1 and isinstance(b, int) and b > 1:  # weights shared by the batch (random kinds): one
            #                                                 matmul per head (exported: broadcast, any batch)
            t, dh = v.shape[2:]
            vb = self.expand_kv(v).permute(1, 2, 0, 3).reshape(self.heads, t, b * dh)
            return (w[0] @ vb).unflatten(2, (b, dh)).permute(2, 0, 1, 3)
        return w @ self.expand_kv(v)

    def _step(self, x, ctx):
        """Decoding (causal): the new tokens at positions offset .. T-1 read the cached V (and K) and their own."""
        p0, t = ctx.offset, x.shape[1]
        self._check_len(p0 + t)
        q, k, v = self._project(x)
        old = ctx.cache.caches.get(slot(ctx, self))
        if old is not None:
            v = torch.cat((old[0], v), dim=2)
            k = None if k is None else torch.cat((old[1], k), dim=2)
        ctx.cache.caches[slot(ctx, self)] = (v, k)
        return self.out(self.attend(x, q, k, v, p0, p0 + t, None))


OP = register(Op(
    decode="the V cache (kv_heads heads; K too when vanilla is mixed in): the logits of a new token need only "
           "that token (dense) or its position (random)",
    family="mha", variant="synthesizer", params=SynthesizerParams, module=SynthesizerAttention,
    causal="yes", shape=synthesizer_shape, supports=frozenset(), cost=synthesizer_cost,
    paper="Synthesizer: Rethinking Self-Attention in Transformer Models, Tay et al. 2020, arXiv:2005.00743",
    summary="softmax(S) V with synthesized logits S: dense W2 relu(W1 x) per token, a learned (or fixed) random "
            "[L, L] table, their factorized forms, or a mixture with q k^T; causal: S masked; O(n^2 d)",
    note="MHA/Others/001.md",
))
