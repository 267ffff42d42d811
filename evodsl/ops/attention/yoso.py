"""mha(yoso, hashes=m, tau=T): YOSO, "You Only Sample (Almost) Once" (Zeng, Xiong, Ravi, Acharya, Fung & Singh
2021, ICML, arXiv:2111.09714): attention as Bernoulli sampling with locality-sensitive hashing.

Per head, with q, k unit-normalised, the weight of key j for query i is the probability that a tau-bit random
hyperplane hash (SimHash: bit t = [r_t . x > 0], r_t ~ N(0, I)) puts them in one bucket,

    E_ij = (1 - arccos(q^_i . k^_j) / pi)^tau,        Y_i = N(sum_j E_ij v_j),    N(y) = y / max(|y|_2, 1e-12)

N, the paper's l2 normalisation of the output, in place of softmax's row sum (HF's normalize: eps 1e-12).
Two forms (mode=):
- sample (the default, the efficient claim): m hash rounds of tau bits each estimate E by its Bernoulli
  indicator, B_ij = (1/m) sum_r [f_r(q_i) = f_r(k_j)]: each key adds its value into round r's bucket table at its
  code (2^tau buckets), each query reads back the bucket of its own code, then the mean over the rounds:
  O(n m tau dh + n m dh) per head, and m 2^tau dh of tables (a constant in n). E[B_ij] = E_ij exactly, so the
  sampled output estimates the expectation form's before N. The hash is invariant to a vector's length, so q and
  k are not normalised here.
- expectation: E itself, [n, n] per head (O(n^2 dh): HF's use_expectation=True, the default of YosoConfig).

Choices where the paper is silent (or this is not the authors' CUDA code): the hyperplanes are one Gaussian
[dh, m tau] draw per layer, shared by the heads, from torch's generator at construction (evodsl.compile(seed=...)
fixes it), kept in the buffer `planes` (state_dict), never redrawn (the authors redraw per forward: here the model
is deterministic and exports); plain Gaussian projections, not the authors' fast Hadamard hash (O(tau dh), not
O(tau log dh), per round); codes from the sign bits by a float32 sum (no matmul; exact in 16-bit dtypes).
Backward: the expectation form's is the exact derivative of (1 - arccos x / pi)^tau (Collision: taken at x clamped
to +-(1 - 1e-6), where it is finite; the forward keeps x in [-1, 1]; HF's custom backward uses the paper's
approximation, tau/2 E k, instead); the sample form's is autograd's through the tables: exact for V (B^T of the
incoming gradient), none for q and k (the codes are piecewise constant; the paper's LSH estimate of their gradient
is not built): train q and k with mode=expectation (HF's default), or accept that. Padding: padded keys' values
are zeroed, in either form (their E_ij v_j is 0): a padded batch equals each sequence alone, on either side (HF's
YosoModel of transformers 5 ignores its attention_mask: 1 + mask / 10000 truncates to 1). GQA: each K/V head's
tables (a view, expanded) serve its group of query heads. No causal form: the paper's attention is bidirectional
(a causal one would need per-prefix bucket tables, cumulative sums over the sequence; not built here). No position
scheme inside; dropout= is refused (HF never applies its attention dropout).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..registry import Op, OpEnv, register
from ._common import AttentionBase, AttentionParams
from ._yoso_cost import yoso_cost
from .isab import no_dropout_shape

GRAD_CLAMP = 1e-6  # the gradient of arccos is taken at |x| <= 1 - this (it is infinite at +-1)


class YosoParams(AttentionParams):
    hashes: int = Field(64, ge=1, le=4096, description="m: hash rounds of the sample form (HF: num_hash)")
    tau: int = Field(9, ge=1, le=16, description="tau: bits per hash, 2^tau buckets (HF: hash_code_len)")
    mode: Literal["sample", "expectation"] = Field("sample", description="sample: m LSH rounds, O(n); "
                                                                         "expectation: E exactly, O(n^2)")


class YosoAttention(AttentionBase):
    def __init__(self, p: YosoParams, env: OpEnv):
        super().__init__(p, env)
        self.m, self.tau, self.mode = p.hashes, p.tau, p.mode
        if p.mode == "sample":  # column r tau + t: bit t of round r
            self.register_buffer("planes", torch.randn(self.head_dim, p.hashes * p.tau))
            self.register_buffer("bit_values", 2.0 ** torch.arange(p.tau, dtype=torch.float32), persistent=False)

    def forward(self, x, ctx):
        b, n, _ = x.shape
        kv, g, dh = self.kv_heads, self.heads // self.kv_heads, self.head_dim
        # q [b, kv, g, n, dh]: query head kv_i g + j reads K/V head kv_i; k, v [b, kv, n, dh] (views)
        q = self.q_proj(x).view(b, n, kv, g, dh).permute(0, 2, 3, 1, 4)
        k = self.k_proj(x).view(b, n, kv, dh).transpose(1, 2)
        v = self.v_proj(x).view(b, n, kv, dh).transpose(1, 2)
        key_mask = self.key_mask(ctx)
        if key_mask is not None:  # a padded key's value zeroed: it adds nothing, in either form
            v = v * key_mask[:, None, :, None].to(v.dtype)
        y = self.sampled(q, k, v) if self.mode == "sample" else self.expected(q, k, v)
        y = F.normalize(y, dim=-1)  # [b, kv, g, n, dh]
        return self.o_proj(y.permute(0, 3, 1, 2, 4).reshape(b, n, self.heads * dh))

    def codes(self, t: torch.Tensor) -> torch.Tensor:
        """t [..., L, dh] -> int64 [..., L, m]: round r's code of each row plus r 2^tau (its table's offset)."""
        bits = (t @ self.planes.to(t.dtype) > 0).float().unflatten(-1, (self.m, self.tau))
        code = (bits * self.bit_values.float()).sum(-1)  # float32 (exact below 2^24) whatever the dtype; no matmul
        return code.long() + torch.arange(self.m, device=t.device) * (1 << self.tau)

    def sampled(self, q, k, v):
        """(1/m) sum_r sum_j [f_r(q_i) = f_r(k_j)] v_j: q [b, kv, g, L, dh], k, v [b, kv, n, dh] -> [b, kv, g, L, dh]
        (the values' width may differ from the keys')."""
        ck = self.codes(k).flatten(2)  # [b, kv, n m]
        b, kv, _, dv = v.shape
        g = q.shape[2]
        tables = v.new_zeros(b, kv, self.m << self.tau, dv)
        src = v[:, :, :, None].expand(-1, -1, -1, self.m, -1).flatten(2, 3)  # [b, kv, n m, dv]
        tables = tables.scatter_add(2, ck[..., None].expand(-1, -1, -1, dv), src)
        del src  # its gradient is the tables' gathered back: scatter_add keeps only the codes
        cq = self.codes(q).flatten(3)  # [b, kv, g, L m]: each group reads its K/V head's tables
        read = tables[:, :, None].expand(-1, -1, g, -1, -1).gather(3, cq[..., None].expand(-1, -1, -1, -1, dv))
        return read.unflatten(3, (-1, self.m)).sum(4).mul_(1.0 / self.m)

    def expected(self, q, k, v):
        """sum_j E_ij v_j, E_ij = (1 - arccos(q^_i . k^_j) / pi)^tau: [b, kv, L, n] weights."""
        x = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)[:, :, None]  # [b, kv, g, L, n]
        return (Collision.apply(x, self.tau) if x.requires_grad else collision(x, self.tau)) @ v[:, :, None]


def collision(x: torch.Tensor, tau: int) -> torch.Tensor:
    """(1 - arccos(x) / pi)^tau, x clamped to [-1, 1] (rounding), in place."""
    return x.clamp_(-1, 1).acos_().mul_(-1 / math.pi).add_(1).pow_(tau)


class Collision(torch.autograd.Function):
    """collision() keeping x alone for its backward, tau (1 - arccos x / pi)^(tau-1) / (pi sqrt(1 - x^2)), taken at
    x clamped to +-(1 - GRAD_CLAMP) (it is infinite at +-1) and recomputed there."""

    @staticmethod
    def forward(ctx, x, tau):
        ctx.tau = tau
        ctx.save_for_backward(x)
        return collision(x.clone(), tau)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        xg = x.clamp(-1 + GRAD_CLAMP, 1 - GRAD_CLAMP)
        r = xg.square().neg_().add_(1).rsqrt_()
        r.mul_(xg.acos_().mul_(-1 / math.pi).add_(1).pow_(ctx.tau - 1)).mul_(grad).mul_(ctx.tau / math.pi)
        return r, None


OP = register(Op(
    decode=None,
    family="mha", variant="yoso", params=YosoParams, module=YosoAttention,
    causal="no", shape=no_dropout_shape("mha(yoso)"), supports=frozenset(),
    paper="You Only Sample (Almost) Once: Linear Cost Self-Attention Via Bernoulli Sampling (YOSO), Zeng et al. "
          "2021, arXiv:2111.09714",
    summary="Y = l2-normalise(E V), E_ij = (1 - arccos(q^_i . k^_j) / pi)^tau, the collision probability of "
            "tau-bit hyperplane hashes; sample: m LSH rounds into 2^tau bucket tables, O(n m (tau dh + dh)); "
            "expectation: E exactly, O(n^2 dh)",
    note="MHA/SparseOrLowRank/015.md", cost=yoso_cost,
))
