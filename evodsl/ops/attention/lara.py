"""mha(lara, C=c, m=s): LARA, linear randomized attention (Zheng et al. 2022), softmax attention estimated by
self-normalized multiple importance sampling (MIS) from C proposals.

Per head, with x' = x / dh^{1/4} (so that exp(q'^T k') = exp(q^T k / sqrt(dh))) and xi(x, w) = exp(w^T x' -
|x'|^2 / 2), softmax attention is the expectation SoftmaxAttn(q_n) = E_{p_n(w)}[f_n(w)] with
p_n(w) ~ N(w; 0, I) xi(q_n, w) sum_j xi(k_j, w) and f_n(w) = sum_j xi(k_j, w) v_j / sum_j xi(k_j, w). LARA draws
from C proposals g_c = N(mu_c, I), mu_c = q~_c + k~_c (q~_c, k~_c: the means of q', k' over the c-th of C
segments of the sequence), m samples w_cs each, and weighs them query by query:

    LARA(q_n) = sum_cs a_nc(w_cs) p~_n(w_cs) / g_c(w_cs) f(w_cs) / sum_cs a_nc(w_cs) p~_n(w_cs) / g_c(w_cs)
    a_nc(w) = g_c(w) / sum_c' g_c'(w) + r_nc - (1/C) sum_c' r_nc',    r_nc = softmax over n of q'_n^T q~_c

(the balance heuristic plus the paper's query-specific correction; the a_nc sum to 1 over c, so the estimate
tends to softmax attention as m grows). a_nc is clamped from below at 1e-8, as in the authors' code. The q-side
factor of p~_n that is constant in w (|q'_n|^2 / 2) cancels, so per query it is a softmax over the C m samples
of w^T q'_n + log(a_nc) + log sum_j xi(k_j, w) - w^T mu_c + |mu_c|^2 / 2 (log N(w; 0, I) / g_c(w), up to a
constant), read against the C m vectors f(w). O(n C m dh): no n x n tensor.

The noise w_cs - mu_c is one draw per layer (the buffer `eps`, [C m, dh], shared by the heads and sequences) from
torch's generator at construction (evodsl.compile(seed=...)), part of the module's state; the paper redraws it
per training step, and its code uses w = mu at evaluation. Segments are those of adaptive average pooling (c
covers ranks floor(c L / C) .. ceil((c + 1) L / C) - 1 of a sequence's L tokens), so every proposal has tokens
even when L < C. Padding: segments and r's normalisation count each sequence's own tokens, padded keys add
nothing to f: a padded batch equals each sequence alone, left or right. The paper's LARA is bidirectional.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field

from ..cost import Cost, Symbols
from ..registry import Op, OpEnv, register
from ._common import AttentionBase, AttentionParams, attention_cost, head_symbols, weightless_shape

ALPHA_FLOOR = 1e-8  # a_nc is clamped from below (the authors' code): the estimate's weights stay positive


class LaraParams(AttentionParams):
    C: int = Field(16, ge=1, le=1 << 12, description="proposals: segments of the sequence whose means centre them")
    m: int = Field(1, ge=1, le=1 << 12, description="samples drawn from each proposal")


def segment_means(keep: torch.Tensor, C: int, dtype) -> torch.Tensor:
    """[b or 1, C, n] averaging matrix: row c averages the tokens of ranks floor(c L / C) .. ceil((c + 1) L / C) - 1
    of each sequence's L tokens (`keep` [b or 1, n], True for a token)."""
    rank = keep.long().cumsum(-1) - 1
    length = keep.sum(-1, keepdim=True)[:, None, :]  # [b, 1, 1]
    c = torch.arange(C, device=keep.device)[None, :, None]
    member = keep[:, None, :] & (rank[:, None, :] >= c * length // C) & (rank[:, None, :] < ((c + 1) * length + C - 1) // C)
    return member.to(dtype).div_(member.sum(-1, keepdim=True))


class LaraAttention(AttentionBase):
    def __init__(self, p: LaraParams, env: OpEnv):
        super().__init__(p, env)
        self.C, self.m = p.C, p.m
        self.register_buffer("eps", torch.randn(p.m * p.C, self.head_dim))  # sample s of proposal s % C

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        q, k, v = self.qkv(x)
        b, h, n, dh = q.shape
        kvh, C, S, c = self.kv_heads, self.C, self.m * self.C, dh ** -0.25
        key_mask = self.key_mask(ctx)
        keep = key_mask if key_mask is not None else torch.ones(1, n, dtype=torch.bool, device=x.device)
        pool = segment_means(keep, C, q.dtype)

        def means(t):  # [b, H, n, dh] (a view of its projection's [b, n, H dh]) -> c * means [b, H, C, dh]
            return (pool @ t.transpose(1, 2).flatten(2)).mul_(c).unflatten(-1, (t.shape[1], dh)).transpose(1, 2)

        qt = means(q)  # q~ [b, h, C, dh]
        mu = qt + self.expand_kv(means(k))  # [b, h, C, dh]
        w = mu.repeat(1, 1, self.m, 1).add_(self.eps)  # the samples [b, h, S, dh]
        # f(w_s) and log sum_j xi(k_j, w_s), per K/V head (its g query heads' samples as one block of rows)
        k = k.contiguous().mul_(c)  # k', one copy in the layout the matmul reads
        lk = (w.view(b, kvh, -1, dh) @ k.transpose(-1, -2)).sub_((k * k).sum(-1)[:, :, None, :].mul_(0.5))
        del k
        if key_mask is not None:
            lk.masked_fill_(~key_mask[:, None, None, :], -math.inf)
        top = lk.detach().amax(-1, keepdim=True)
        e = lk.sub_(top).exp_()  # [b, kv, g S, n], in place of the logits
        z = e.sum(-1, keepdim=True)
        f = ((e @ v) / z).view(b, h, S, dh)
        del lk, e, v
        # per sample: log sum_j xi(k_j, w) - log g_c(w) + log N(w; 0, I), whose |w|^2 / 2 cancel
        lg = w @ mu.transpose(-1, -2) - (mu * mu).sum(-1)[:, :, None, :] / 2  # log g_c'(w_s) + const [b, h, S, C]
        own = lg.view(b, h, self.m, C, C).diagonal(dim1=-2, dim2=-1).reshape(b, h, S)  # c' = c(s)
        beta = z.log().add_(top).view(b, h, S) - own  # [b, h, S]
        balance = (own - lg.logsumexp(-1)).exp_()  # g_c(w_s) / sum_c' g_c'(w_s)
        del lg, own, z, top
        # r_nc: softmax over the queries of q'_n^T q~_c (padded queries left out)
        q = q.contiguous().mul_(c)  # q', one copy in the layout both matmuls read
        lr = q @ qt.transpose(-1, -2)  # [b, h, n, C]
        if key_mask is not None:
            lr.masked_fill_(~key_mask[:, None, :, None], -math.inf)
        r = lr.softmax(-2)
        del lr
        r = r - r.mean(-1, keepdim=True)
        # a_ns = balance_s + r_n,c(s) - mean_c r_nc, laid out [n, m, C] = [n, S]
        alpha = (r[:, :, :, None, :] + balance.view(b, h, 1, self.m, C)).view(b, h, n, S)
        del r
        logits = (q @ w.transpose(-1, -2)).add_(beta[:, :, None, :]).add_(alpha.clamp_min_(ALPHA_FLOOR).log_())
        del alpha, q
        o = logits.softmax(-1) @ f
        del logits
        return self.out(o)


def lara_cost(p: LaraParams, env: OpEnv, s: Symbols) -> Cost:
    """The segment means of q and k ([C, n] @ [n, dh] per head; the averaging matrix has no gradient), per K/V
    head the samples' key logits [S, n] (S = C m) and e V, the proposals' densities [S, C], r's logits [n, C],
    the queries' logits [n, S] and their weights @ f. Kept: the averaging matrix, k' and a copy of v, the samples,
    e = exp(key logits), e V and its sums, mu (and a transposed copy), the densities, their logsumexp, the
    balance, q~ (a copy), q', r, a (clamped and as clamped, for the log), the weights, f, o_proj's copy."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    C, m = s.sym("C", p.C), s.sym("m", p.m)
    S = C * m
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    means = 2 * b * C * n * (h + kv) * dh
    mm = 4 * b * h * S * n * dh + 2 * b * h * S * C * dh + 2 * b * h * n * C * dh + 4 * b * h * n * S * dh
    other = b * h * (5 * S * n + 5 * n * S + 5 * n * C + 3 * S * C)
    core = Cost(fwd=means + mm, bwd=means + 2 * mm, fwd_other=other, bwd_other=2 * other)
    bh = b * h * by
    small = C * n * by + bh * (2 * S * dh + 2 * C * dh + 2 * S)  # the averaging matrix, w, f, q~, mu, beta, balance
    saved = C * n * by + 2 * kvb + 2 * q + bh * (S * n + 3 * S * dh + 3 * C * dh + S * C + 3 * S + n * C + 3 * n * S)
    phases = [q + 3 * kvb + bh * S * n + small,  # the key logits, beside k' * k'
              q + 2 * kvb + bh * S * n + bh * S * dh + small,  # e V, beside v's copy
              2 * q + small,  # q' made
              q + bh * (n * C + n * S) + small,  # a beside r
              q + 2 * bh * n * S + small,  # the logits beside a; then o beside the weights and the logits
              2 * q + out + small]  # o_proj
    # backward: at the queries' weights, the gradients of the weights, the logits, a (its log's and its clamp's)
    # and q', beside that of f, with the weights, f and o_proj's copy released
    bwd = [q, 4 * bh * n * S - q]  # (first o_proj's input gradient)
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=0, bwd_phases=bwd)


OP = register(Op(
    decode=None,  # bidirectional only: the proposals are the means of segments of the whole sequence
    family="mha", variant="lara", params=LaraParams, module=LaraAttention,
    causal="no", shape=weightless_shape("mha(lara)"), cost=lara_cost,
    paper="Linear Complexity Randomized Self-attention Mechanism, Zheng et al. 2022, arXiv:2204.04667",
    summary="self-normalized multiple importance sampling of softmax attention from C proposals N(q~_c + k~_c, I) "
            "(segment means), m samples each, query-specific MIS weights; O(n C m dh)",
    note="MHA/RightProduct/004.md",
))
