"""mha(mla, kv_rank, q_rank, rope_dim, nope_dim, v_dim): multi-head latent attention (DeepSeek-V2, DeepSeek-AI
2024, arXiv:2405.04434, section 2.1).

Keys and values of every head come from one low-rank latent per token, and a single rotary key is shared by all
heads (decoupled RoPE), so that decoding caches kv_rank + rope_dim numbers per token instead of 2 h dh:

    c_t  = RMSNorm(W_dkv x_t)                              (kv_rank)      the latent: the cache
    k_t^R = RoPE(W_kr x_t)                                  (rope_dim)     one key for all heads: the cache
    [k_{t,i}^C; v_{t,i}] = W_ukv,i c_t                      (nope_dim, v_dim per head i)
    q_t = W_q x_t, or W_uq RMSNorm(W_dq x_t) (q_rank > 0);  [q_{t,i}^C; q_{t,i}^R] = q_{t,i}  (nope_dim; rope_dim)
    q_{t,i}^R <- RoPE(q_{t,i}^R)
    o_{t,i} = sum_j softmax_j((q_{t,i}^C . k_{j,i}^C + q_{t,i}^R . k_j^R) / sqrt(nope_dim + rope_dim)) v_{j,i}
    u_t = W_o [o_{t,1}; ..; o_{t,h}]

Choices where the paper is silent, as DeepSeek's released code and HF transformers' deepseek_v2 lay them out, so
that checkpoints load as they are: W_dkv and W_kr are one [kv_rank + rope_dim, d] matrix (kv_down); W_uk and W_uv
one matrix whose rows are, per head, nope_dim key rows then v_dim value rows (kv_up); W_q's (W_uq's) rows are, per
head, nope_dim then rope_dim; the RMSNorms have a gain and eps 1e-6. bias=true puts biases on the projections that
read x (kv_down, q_proj or q_down) and on o_proj; the up-projections have none (HF's layout; on W_uk a bias is
constant across keys, so softmax removes it; on W_uv it folds into o_proj's). The rotation is the model's
pos(rope) (its pairs, base and scaling), turning the rope_dim channels: DeepSeek's checkpoints pair channels
(2i, 2i+1), pos(rope, pairs=interleaved). Without a position scheme the rope channels are plain, unrotated ones.

The forward is F.scaled_dot_product_attention over full per-head keys [k^C; k^R] (the latent up-projected), v
zero-padded to the score width (or q, k padded to v's) so that the fused kernel runs; no dropout (DeepSeek
trains without). Decoding caches c and k^R only and runs the absorbed form (the paper's section 2.1.2):
q_{t,i}^C . (W_uk,i c_j) = (W_uk,i^T q_{t,i}^C) . c_j, so each query head is moved into the latent once, the
cached [c; k^R] serves every head as one shared key (MQA over kv_rank + rope_dim channels, v = the same rows:
the output's rope channels are dropped), and W_uv,i is applied after the weighted sum. A step then costs
O(S h kv_rank) against the S cached tokens instead of up-projecting all S latents (O(S kv_rank h (nope + v)))
at every step; the prefill runs the same absorbed form (one code path). kv_heads and head_dim do not apply
(the latent is shared by every head; nope_dim, rope_dim and v_dim set the widths).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...decode import slot
from ..norm.rmsnorm import RMSNorm, RMSNormParams
from ..position.rope import rotary_channels
from ..registry import Op, OpEnv, OpParams, ShapeProblem, register
from ._common import AttentionBase
from ._mla_cost import mla_cost

NORM_EPS = 1e-6  # the latents' RMSNorm, as DeepSeek's and HF's code


class MLAParams(OpParams):
    heads: int = Field(8, ge=1, le=4096, description="query heads")
    kv_rank: int = Field(512, ge=1, le=65536, description="width of the latent c every head's K and V come from")
    q_rank: int = Field(0, ge=0, le=65536, description="width of the query latent; 0: no query compression")
    rope_dim: int = Field(64, ge=2, le=4096, description="width of the rotary part of q and of the shared key")
    nope_dim: int = Field(128, ge=1, le=4096, description="per-head q/k width without rotation")
    v_dim: int = Field(128, ge=1, le=4096, description="per-head value width")
    bias: bool = Field(True, description="biases on the projections reading x (kv_down, q_proj/q_down) and o_proj")

    @property
    def head_dim(self) -> int:
        """The width the in-attention position scheme turns (what the shapes pass attaches it with): rope_dim."""
        return self.rope_dim


def mla_shape(p: MLAParams, env: OpEnv):
    if len(env.shape) != 3 or not isinstance(env.d, int):
        raise ShapeProblem(f"attention needs a [b, n, d] stream, got [{', '.join(map(str, env.shape))}]")
    if env.pos is not None and env.pos[0].variant == "rope":
        try:
            rotary_channels(env.pos[1], p.rope_dim)
        except ShapeProblem as e:
            raise ShapeProblem(e.message.replace("head_dim", "rope_dim"), "rope_dim",
                               "mha(mla) rotates fraction x rope_dim channels: make that an even number") from None
    return env.shape


def _rmsnorm(width: int) -> RMSNorm:
    return RMSNorm(RMSNormParams(eps=NORM_EPS), OpEnv(in_shapes=(("b", "n", width),)))


class MultiHeadLatentAttention(AttentionBase):
    """AttentionBase for its masks only: its projections are MLA's own (nn.Module's __init__, not the base's)."""

    def __init__(self, p: MLAParams, env: OpEnv):
        nn.Module.__init__(self)
        d, h = env.d, p.heads
        self.heads, self.causal, self.dropout = h, env.causal, 0.0
        self.rank, self.rope, self.nope, self.v_dim = p.kv_rank, p.rope_dim, p.nope_dim, p.v_dim
        self.width = max(p.nope_dim + p.rope_dim, p.v_dim)  # SDPA's head width: q, k and v padded to it
        self.scale = 1.0 / math.sqrt(p.nope_dim + p.rope_dim)
        if p.q_rank:
            self.q_down = nn.Linear(d, p.q_rank, bias=p.bias)
            self.q_norm = _rmsnorm(p.q_rank)
            self.q_up = nn.Linear(p.q_rank, h * (p.nope_dim + p.rope_dim), bias=False)
        else:
            self.q_proj = nn.Linear(d, h * (p.nope_dim + p.rope_dim), bias=p.bias)
        self.kv_down = nn.Linear(d, p.kv_rank + p.rope_dim, bias=p.bias)
        self.kv_norm = _rmsnorm(p.kv_rank)
        self.kv_up = nn.Linear(p.kv_rank, h * (p.nope_dim + p.v_dim), bias=False)
        self.o_proj = nn.Linear(h * p.v_dim, d, bias=p.bias)
        self.pos = env.pos[0].attach(env.pos[1], h, p.rope_dim) if env.pos else None

    def queries(self, x: torch.Tensor, offset: int):
        """q^C [b, h, n, nope], q^R [b, h, n, rope] (rotated at positions offset..)."""
        b, n, _ = x.shape
        q = self.q_up(self.q_norm(self.q_down(x))) if hasattr(self, "q_down") else self.q_proj(x)
        return q.view(b, n, self.heads, self.nope + self.rope).transpose(1, 2).split([self.nope, self.rope], -1)

    def latent(self, x: torch.Tensor):
        """c [b, n, kv_rank] (normalized) and k^R [b, 1, n, rope] (not yet rotated)."""
        b, n, _ = x.shape
        c, kr = self.kv_down(x).split([self.rank, self.rope], -1)
        return self.kv_norm(c), kr.view(b, 1, n, self.rope)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        if self.pos is not None:
            self.pos.bind(ctx)
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        b, n, _ = x.shape
        qc, qr = self.queries(x, 0)
        c, kr = self.latent(x)
        if self.pos is not None:
            qr, kr = self.pos.rotate(qr, kr, 0)
        kv = self.kv_up(c).view(b, n, self.heads, self.nope + self.v_dim).transpose(1, 2)
        kc, v = kv.split([self.nope, self.v_dim], -1)
        pad = self.width - self.nope - self.rope
        q = torch.cat((qc, qr) if not pad else (qc, qr, qr.new_zeros(b, self.heads, n, pad)), -1)
        k = torch.cat((kc, kr.expand(b, self.heads, n, self.rope)) if not pad else
                      (kc, kr.expand(b, self.heads, n, self.rope), kr.new_zeros(b, self.heads, n, pad)), -1)
        if self.v_dim < self.width:
            v = F.pad(v, (0, self.width - self.v_dim))
        allowed = self.allowed(ctx, n, x.device)  # key padding: None without any (the fused path stays)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=self.causal and allowed is None,
                                           scale=self.scale)
        return self.out(o[..., :self.v_dim] if self.v_dim < self.width else o)

    def _step(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """Decoding, absorbed: the cache [b, S, kv_rank + rope] holds [c; k^R (rotated)] of every position so
        far; each query head moves into the latent (q^C W_uk), reads the cache as one shared key (and value),
        and the latent weighted sum leaves through W_uv."""
        start = ctx.offset
        b, n, _ = x.shape
        qc, qr = self.queries(x, start)
        c, kr = self.latent(x)
        if self.pos is not None:
            qr, kr = self.pos.rotate(qr, kr, start)
        w = self.kv_up.weight.view(self.heads, self.nope + self.v_dim, self.rank)
        new = torch.cat((c, kr.squeeze(1)), -1)  # [b, n, kv_rank + rope]
        old = ctx.cache.caches.get(slot(ctx, self))
        cache = new if old is None else torch.cat((old[0], new), 1)
        ctx.cache.caches[slot(ctx, self)] = (cache,)
        q = torch.cat((qc @ w[:, :self.nope], qr), -1)  # [b, h, n, kv_rank + rope]
        mask = None
        if start and n > 1:  # a chunk after the cache: the causal mask aligned at the end
            i, j = torch.arange(start, start + n, device=x.device), torch.arange(start + n, device=x.device)
            mask = j[None, :] <= i[:, None]
        kv = cache.unsqueeze(1)  # [b, 1, S, kv_rank + rope]: one key and value head for all
        o = F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask, is_causal=self.causal and mask is None and not start,
                                           scale=self.scale, enable_gqa=True)
        return self.out(o[..., :self.rank] @ w[:, self.nope:].transpose(1, 2))  # [b, h, n, v]


OP = register(Op(
    decode="the latent c (kv_rank) and the rotated shared key k^R (rope_dim) of every position so far; steps in "
           "the absorbed form",
    family="mha", variant="mla", params=MLAParams, module=MultiHeadLatentAttention,
    causal="yes", shape=mla_shape, supports=frozenset({"rope"}),
    paper="DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model, DeepSeek-AI 2024, "
          "arXiv:2405.04434",
    summary="K, V per head up-projected from a shared RMSNormed latent c = W_dkv x (the cache, with one rotary key "
            "k^R = RoPE(W_kr x) for all heads); softmax((q^C k^C + q^R k^R) / sqrt(nope + rope)) V",
    note="", cost=mla_cost,
))
