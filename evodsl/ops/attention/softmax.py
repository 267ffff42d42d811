"""mha(softmax): scaled dot-product attention, softmax(Q K^T / sqrt(dh)) V per head (scale=s: Q K^T * s; T5: 1).

Lowers to F.scaled_dot_product_attention. With kv_heads=1 it is multi-query attention (Shazeer 2019), with
1 < kv_heads < heads grouped-query attention (Ainslie et al. 2023). Inside residual(..., scores=true) it is
RealFormer's residual attention (He et al. 2020): the raw scores of the previous such layer are added before
the softmax, so the scores are materialized (O(n^2) memory, as the method requires).
With softcap= (Gemma 2), sink_logit= (gpt-oss) or talking=true (talking heads) it runs the explicit-score kernel
of _scored.py instead (_softcap.py, _sinks.py, _talking.py say what each does and what it refuses). collab=D_k
(collaborative heads, _collab.py) shares the query and key projections between the heads, on SDPA.
qk_norm=true, qk_len=L (QKNorm, Henry et al. 2020, _qknorm.py) l2-normalises each head's q and k and scales their
cosine by one learned g, g(0) = log2(L^2 - L), in place of 1/sqrt(dh), on SDPA.
"""
from __future__ import annotations

import math
from dataclasses import replace

import sympy as sp
import torch
import torch.nn.functional as F

from pydantic import Field

from ..cost import Cost, Symbols
from ..registry import Op, OpEnv, register
from ...decode import append_kv
from ._xl import xl_attention_cost, xl_forward
from ._collab import CollabParams, check_collab, collab_scale
from ._collab_cost import collab_cost
from ._common import (LSE_BYTES, AttentionBase, AttentionParams, attention_cost, attention_shape, head_symbols,
                      learned_bias, position_cost, rotates, score_bias)
from ._scored import head_scale, scored_forward
from ._scored_cost import scored_cost
from ._sinks import SinkLogitParams, sink_logit
from ._softcap import SoftcapParams, check_modifiers, modifiers
from ._talking import TalkingParams, talking_heads, talking_width
from ._qknorm import QKNormParams, check_qk_norm, qk_apply, qk_gain, qk_norm_cost


class SoftmaxAttentionParams(QKNormParams, SoftcapParams, SinkLogitParams, TalkingParams, CollabParams,
                             AttentionParams):
    scale: float | None = Field(None, gt=0, description="score scale; default 1/sqrt(head_dim) (T5: 1.0, the "
                                                        "scale folded into its initialisation)")


class SoftmaxAttention(AttentionBase):
    def __init__(self, p: SoftmaxAttentionParams, env: OpEnv):
        super().__init__(p, env)
        self.residual_scores = env.residual_scores
        self.scale = collab_scale(self, p.scale)  # None: SDPA's 1/sqrt(head_dim); collab=: sqrt(D_k / h)
        self.mem_len = env.memory[1].mem_len if env.memory else 0  # memory(xl): inputs kept from earlier segments
        self.xl = bool(self.mem_len) or getattr(self.pos, "relative", False)  # Transformer-XL's path (_xl.py)
        # softcap=, sink_logit=: the explicit-score kernel (_scored.py)
        self.modified, self.variant, self.window, self.sinks = bool(modifiers(p)), "softmax", None, 0
        self.softcap, self.sink_logit = p.softcap, sink_logit(p, talking_width(p, self.heads))  # H with talking=
        self.talking = talking_heads(p, self.heads)  # talking=: P_l, P_w (_talking.py)
        self.score_scale = head_scale(self.head_dim, p.scale)
        self.qk_gain = qk_gain(p)  # qk_norm=true: QKNorm's g (_qknorm.py), SDPA's scale 1
        if self.qk_gain is not None:
            self.scale = 1.0
        if hasattr(self.pos, "adopt"):  # a scheme that adjusts its attention (pos(deberta), pos(tupe))
            self.pos.adopt(self)

    def _bias(self, n: int, device, start: int = 0) -> torch.Tensor | None:
        """The position scheme's bias [h, n, start + n] of queries start.. against keys 0.. (decoding: start
        positions are cached), -inf after each query when causal; None without a scheme that adds one."""
        if self.pos is None:
            return None
        if start:
            i, j = torch.arange(start, start + n, device=device), torch.arange(start + n, device=device)
            bias = self.pos.bias(i[:, None], j[None, :])
        else:
            bias = self.pos.dense(n, device)
        if bias is not None and self.causal:
            i, j = torch.arange(start, start + n, device=device), torch.arange(start + n, device=device)
            bias.masked_fill_(j[None, :] > i[:, None], float("-inf"))  # in place: the bias is ours, new
        return bias

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        if getattr(self.pos, "attends", False):
            return self.pos.attend(self, x, ctx)
        if self.modified:
            return scored_forward(self, x, ctx)
        if self.xl:
            return xl_forward(self, x, ctx)
        if self.pos is not None:
            self.pos.bind(ctx)
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        q, k, v = self.qkv(x)
        if self.qk_gain is not None:
            q, k = qk_apply(self.qk_gain, q, k)
        n = x.shape[1]
        drop = self.dropout if self.training else 0.0
        allowed = self.allowed(ctx, n, x.device)  # key padding: None without any (the flash path stays)
        if self.residual_scores:
            return self.out(self._residual_scores(q, k, v, ctx, drop, allowed))
        bias = self._bias(n, x.device)
        if bias is not None:  # [1, h, n, n]: the fused kernels take a 2-D or 4-D mask only (3-D falls back to math)
            bias = bias.to(q.dtype).unsqueeze(0)
        if allowed is not None:  # [b, 1, n, n] bool, or the bias with the padded keys at -inf, [b, h, n, n]
            bias = allowed if bias is None else bias.masked_fill(~allowed, float("-inf"))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop,
                                           is_causal=self.causal and bias is None, scale=self.scale,
                                           enable_gqa=self.kv_heads != self.heads)
        return self.out(o)

    def _step(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """Decoding: the new positions' queries against the cached keys and values and their own (appended to
        the cache), each reading only its past; no padding (generate takes whole rows)."""
        start = ctx.offset
        q, k, v = self.qkv(x, start)
        if self.qk_gain is not None:
            q, k = qk_apply(self.qk_gain, q, k)
        k, v = append_kv(ctx, self, k, v)
        n = x.shape[1]
        if self.residual_scores:
            keep = torch.arange(start + n, device=x.device)[None, :] <= torch.arange(start, start + n,
                                                                                       device=x.device)[:, None]
            return self.out(self._residual_scores(q, k, v, ctx, 0.0, keep, start))
        bias = self._bias(n, x.device, start)
        if bias is None and self.causal and start and n > 1:  # a chunk after the cache: the mask aligned at the end
            i, j = torch.arange(start, start + n, device=x.device), torch.arange(start + n, device=x.device)
            bias = j[None, :] <= i[:, None]
        elif bias is not None:
            bias = bias.to(q.dtype).unsqueeze(0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=self.causal and bias is None and not start,
                                           scale=self.scale, enable_gqa=self.kv_heads != self.heads)
        return self.out(o)

    def _residual_scores(self, q, k, v, ctx, drop, allowed=None, start: int = 0):
        scores = q @ self.expand_kv(k).transpose(-1, -2) * (self.scale or 1 / math.sqrt(self.head_dim))
        if ctx.scores is not None:
            scores = scores + ctx.scores
        ctx.scores = scores
        n = q.shape[2]
        bias = self._bias(n, q.device, start)
        s = scores if bias is None else scores + bias
        if allowed is not None:  # padding (and the causal mask with it)
            s = s.masked_fill(~allowed, float("-inf"))
        elif self.causal and bias is None:
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        w = F.dropout(s.softmax(-1), drop)
        return w @ self.expand_kv(v)


def softmax_attention_cost(p: SoftmaxAttentionParams, env: OpEnv, s: Symbols) -> Cost:
    """SDPA on [b, h, n, n] scores (GQA read in place); RealFormer's path runs the matmuls itself and keeps the
    [b, h, n, n] weights. With ALiBi the [1, h, n, n] bias is SDPA's mask, and SDPA keeps it for backward."""
    if env.pos is not None and getattr(env.pos[0].attach, "attends", False):  # pos(deberta)
        return env.pos[0].attach.attention_cost(p, env, s)
    if modifiers(p):
        return scored_cost(p, env, s)
    if getattr(p, "collab", None):  # softmax params only: bigbird, etc and others call this with their own
        return collab_cost(p, env, s)
    h, kv, dh = head_symbols(p, s)
    if env.memory or (env.pos is not None and getattr(env.pos[0].attach, "relative", False)):
        return xl_attention_cost(p, env, s, h, kv, dh)  # Transformer-XL's path
    b, n, by = s.b, s.n, s.bytes
    pos = position_cost(env, s, h, kv, dh)
    scores, bias = b * h * n ** 2, (h * n ** 2 * by if score_bias(env) else 0)
    dropout = p.dropout > 0  # the cost of training: dropout on the weights is active
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by  # q (and o), k (and v), the output
    qkv = q + 2 * kvb
    if env.residual_scores:  # scores = q k^T / sqrt(dh) (+ previous scores), (+ bias, masked), softmax, @ v
        w = scores * by  # one [b, h, n, n] tensor: the scores (kept in ctx), a masked copy, the weights
        masked = w if env.causal or score_bias(env) else 0
        mask = n ** 2 if env.causal and not score_bias(env) else 0  # the bool causal mask masked_fill keeps
        v_copy = q if kv != h else q * sp.Min(1, b - 1)  # v repeated to h heads, or made contiguous for bmm
        core = Cost(fwd=4 * scores * dh, bwd=8 * scores * dh, fwd_other=8 * scores, bwd_other=16 * scores)
        saved = 3 * q + w * (1 + 2 * dropout) + mask + q + pos.saved  # q, k, v (h heads), the weights (with
        # dropout: its float mask and the dropped weights), o_proj's copy of the output
        phases = [qkv + 2 * w + masked + v_copy + q + bias,  # at weights @ v
                  qkv + w + 2 * q + bias + out]  # at o_proj: the scores, the output and its copy, the result
        pos_phase = qkv + pos.peak + (w if score_bias(env) else 0)  # the bias is built after the scores
        # backward: the gradients of v and of the weights; then the scores' (softmax) beside the weights',
        # v's summed to its K/V heads, o's gradient and v released (with dropout: the dropped weights first)
        bwd = [q + w] if dropout else [q + w, 2 * w + kvb - 2 * q]
    else:
        copy = q if rotates(env) else 0  # o_proj's input: a copy unless SDPA's output is laid out [b, n, h, dh]
        core = Cost(fwd=4 * scores * dh, bwd=10 * scores * dh, fwd_other=5 * scores, bwd_other=10 * scores)
        saved = qkv + q + LSE_BYTES * b * h * n + copy + bias + pos.saved
        math_kernel = dropout or learned_bias(env)  # in training: dropout (the fused CPU kernel has none), or a
        # bias with a gradient (T5's); it computes in float32
        if math_kernel:
            core = replace(core, bwd=8 * scores * dh)
            weights = 3 if dropout else 1  # the weights (with dropout: its float mask and the dropped weights)
            causal_mask = n ** 2 if env.causal and learned_bias(env) else 0  # masked_fill_ on a bias with a grad
            saved = (3 * b * n * h * dh + weights * scores) * max(by, 4) + q + causal_mask + pos.saved  # scaled
            # q, k; v (h heads); the weights; o_proj's copy of the output
        phases = [qkv + q + copy + bias + out]  # at o_proj: q, k, v, SDPA's output (and its copy), the output
        pos_phase = qkv + pos.peak  # while the position scheme is applied
        bwd = [2 * q + 2 * kvb - copy]  # the kernel: o's gradient and those of q, k, v (of the K/V heads),
        # o_proj's copy released
        if dropout:  # the math kernel (in float32): v's gradient and the dropped weights'
            bwd = [q + scores * max(by, 4)]
        elif math_kernel:  # the weights' gradient beside the scores', o_proj's copy released
            bwd = [2 * scores * max(by, 4) - q]
    if getattr(p, "qk_norm", False):  # QKNorm: raw q, k, v, q^ and q's norms [b, h, n, 1] (_qknorm.py)
        phases.append(qkv + q + b * h * n * by)
    if env.pos is not None:
        phases.append(pos_phase)
    out = attention_cost(p, s, h, kv, dh, core, pos, saved, phases, cache=2 * b * n * kv * dh * by, bwd_phases=bwd)
    if not getattr(p, "qk_norm", False):
        return out
    flags = {f: getattr(out, f) for f in ("saves_input", "saves_output", "inplace", "inplace_in_training")}
    return replace(out + qk_norm_cost(p, s, h, kv, dh), **flags)  # QKNorm's normalisations (_qknorm.py)


def softmax_shape(p: SoftmaxAttentionParams, env: OpEnv):
    if env.pos is not None and getattr(env.pos[0].attach, "attends", False):  # pos(deberta)
        env.pos[0].attach.check(p, env)
    check_modifiers("mha(softmax)", p, env)
    check_collab("mha(softmax)", p, env, modifiers(p))
    check_qk_norm("mha(softmax)", p, env, modifiers(p) + ([f"collab={p.collab}"] if p.collab else []))
    return attention_shape(p, env)


OP = register(Op(
    decode="a K/V cache of every position so far (kv_heads heads)",
    family="mha", variant="softmax", params=SoftmaxAttentionParams, module=SoftmaxAttention,
    causal="yes", shape=softmax_shape, supports=frozenset({"rope", "xpos", "alibi", "kerple", "randomized_rope", "t5_bias", "xl_rel",
                                                             "deberta", "diet", "tupe", "huang", "residual_scores", "memory"}),
    paper="Attention Is All You Need, Vaswani et al. 2017, arXiv:1706.03762",
    summary="softmax(Q K^T * scale) V per head, scale 1/sqrt(dh) by default; kv_heads < heads shares K/V heads "
            "(MQA/GQA)",
    cost=softmax_attention_cost,
    note="README.md; Head/002.md (MQA)",
))
