"""The chunked kernel of gated linear attention (RetNet's retention, GLA), shared by those variants, and its
recurrent step.

Per head, with keys and queries of width dk, values of width dv, a state S_t [dk, dv] and a log decay g_t <= 0
(one per head and token, `scalar`, or one per key channel, `vector`: a_t = exp(g_t)):

    S_t = diag(a_t) S_(t-1) + k_t v_t^T,        o_t = q_t^T S_t        (S_0 given, zero by default)

The chunked form (Yang et al. 2023, arXiv:2312.06635 section 4; Sun et al. 2023, arXiv:2307.08621 eq. 7): in
chunks of C tokens, with B_i = g_1 + .. + g_i the decay accumulated in the chunk up to its token i (log space),

    o_i = (q_i * exp(B_i))^T S  +  sum_{j<=i} (q_i * exp(B_i - B_j))^T k_j v_j        (S: the state before)
    S'  = exp(B_C) * S + sum_j (k_j * exp(B_C - B_j)) v_j^T

The intra-chunk products of all chunks run at once ([C, C] blocks); only the state is carried chunk to chunk (a
Python loop over the ceil(n / C) chunks, never over tokens): O(n C dk + n dk dv) time, no n x n tensor.
Scalar decay: the ratios exp(B_i - B_j) form a [C, C] matrix per head (j <= i: at most 1, no overflow). Vector
decay: q_i exp(B_i) against k_j exp(-B_j) (GLA's factorisation), which keeps the blocks [C, C] as one matmul but
needs exp(-B_j) finite. Where some chunk's decay passes exp(-0.8 ln(max float)) in some channel (float32: e^-71;
a gate that forgets at once, where the factorised form would give inf and nan), the scores take the ratios
exp(B_i - B_j) <= 1 instead, one lag at a time (DecayScores), exact at any decay. The ops' declared costs are the
factorised form's: the ratios' form runs its [C, C] products elementwise (no matmul FLOPs) and its memory differs
(measured: rnn(rwkv6) keeps and peaks at a few % less; mha(gsa)'s backward, whose fused gradients are made at
once, peaks at about twice the declared; benchmarks/bench_decay_ratios.py has its time).
Tokens past n (the last chunk padded) have k = 0 and g = 0: they change neither the outputs nor the state.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _chunks(t: torch.Tensor, C: int, pad: int) -> torch.Tensor:
    """[b, h, n, ...] -> [b, h, m, C, ...], zero-padded to m C tokens."""
    if pad:
        t = F.pad(t, (0, 0) * (t.dim() - 3) + (0, pad))
    b, h, n = t.shape[:3]
    return t.reshape(b, h, n // C, C, *t.shape[3:])


def chunked_decay(q, k, v, g, state=None, chunk: int = 64):
    """q, k [b, h, n, dk], v [b, h, n, dv], g [b, h, n] (scalar decay) or [b, h, n, dk] (vector), the state before
    [b, h, dk, dv] or None (zero) -> (o [b, h, n, dv], the state after [b, h, dk, dv])."""
    b, h, n, dk = q.shape
    C = min(chunk, n)
    pad = -n % C
    vector = g.dim() == 4
    q, k, v, g = (_chunks(t, C, pad) for t in (q, k, v, g))  # [b, h, m, C, ...]
    B = g.cumsum(3)  # the decay accumulated within the chunk, up to and with token i
    last = B[:, :, :, -1:]  # B_C of every chunk
    future = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
    if vector:
        if not torch.compiler.is_compiling() and factorisable(last):  # (compiled: no branch on the data)
            qd, kd = q * B.exp(), k * (-B).exp()
            a = (qd @ kd.transpose(-1, -2)).masked_fill(future, 0.0)  # [b, h, m, C, C]
        else:  # exp(-B_j) would leave the float range: the ratios, each at most 1, one lag at a time
            qd, a = q * B.exp(), DecayScores.apply(q, k, B)
        kc = k * (last - B).exp()  # k_j exp(B_C - B_j): into the state
        carry = last.squeeze(3).exp()[..., None]  # [b, h, m, dk, 1]
    else:
        ratio = (B[..., :, None] - B[..., None, :]).masked_fill(future, float("-inf")).exp()  # [b, h, m, C, C]
        a = (q @ k.transpose(-1, -2)) * ratio
        qd = q * B.exp()[..., None]
        kc = k * (last - B).exp()[..., None]
        carry = last.exp()[..., None]  # [b, h, m, 1, 1]
    local = kc.transpose(-1, -2) @ v  # [b, h, m, dk, dv]: each chunk's own contribution to the state
    s = q.new_zeros(b, h, dk, v.shape[-1]) if state is None else state
    before = []
    # unbound once (indexing chunk c in the loop would give each chunk's gradient the size of all of them)
    for keep, own in zip(carry.unbind(2), local.unbind(2)):  # the state before each chunk: a loop over chunks only
        before.append(s)
        s = keep * s + own
    o = qd @ torch.stack(before, 2) + a @ v  # [b, h, m, C, dv]
    return o.reshape(b, h, -1, v.shape[-1])[:, :, :n], s


def factorisable(last: torch.Tensor) -> bool:
    """Whether GLA's factorisation q_i exp(B_i) . k_j exp(-B_j) is safe for chunks whose decay reaches `last`
    (B_C, every chunk and channel): exp(-B_C) at most max float^0.8 (float32: e^71, float64: e^568), which leaves
    the keys a factor of max float^0.2 (float32: e^17.7) before k exp(-B) overflows, and exp(B) normal. Past it the
    factorised form gives inf and nan, so the ratios' form runs only where this one would fail. A data-dependent
    test (one reduction of the detached decay, read on the host: min() would keep B alive for a backward)."""
    return bool(last.detach().min() >= -0.8 * math.log(torch.finfo(last.dtype).max))


def lag_ratios(B: torch.Tensor, lag: int) -> torch.Tensor:
    """exp(B_i - B_(i-lag)) for i = lag..C-1, B [..., C, dk] -> [..., C - lag, dk]: each at most 1 (B does not
    increase along the chunk), so no decay overflows."""
    C = B.shape[-2]
    return (B[..., lag:, :] - B[..., :C - lag, :]).exp_()


class DecayScores(torch.autograd.Function):
    """a_ij = sum_c q_ic k_jc exp(B_ic - B_jc) for j <= i (0 above), q, k, B [..., C, dk] -> a [..., C, C]: the
    intra-chunk scores of a vector decay where the factorisation would overflow. Every ratio is at most 1 (B does
    not increase), so any decay is exact; one lag j = i - l at a time, so no [C, C, dk] tensor is held: the
    forward and the backward (which recomputes the ratios) hold [C, dk] tensors, and it saves only its inputs.
    2.5 C^2 dk multiply-adds and C^2 dk / 2 exps a chunk, against the factorised form's C^2 dk matmul."""

    @staticmethod
    def forward(ctx, q, k, B):
        C = q.shape[-2]
        a = q.new_zeros(*q.shape[:-1], C)
        for lag in range(C):
            qi, kj = q[..., lag:, :], k[..., :C - lag, :]
            a.diagonal(-lag, -2, -1).copy_((qi * kj * lag_ratios(B, lag)).sum(-1))
        ctx.save_for_backward(q, k, B)
        return a

    @staticmethod
    def backward(ctx, grad):
        q, k, B = ctx.saved_tensors
        C = q.shape[-2]
        gq, gk, gB = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(B)
        for lag in range(C):
            qi, kj = q[..., lag:, :], k[..., :C - lag, :]
            t = lag_ratios(B, lag).mul_(grad.diagonal(-lag, -2, -1)[..., None])
            gq[..., lag:, :] += t * kj
            gk[..., :C - lag, :] += t * qi
            t.mul_(qi).mul_(kj)  # d a_ij / d B_i = a_ij's term, d / d B_j its negative
            gB[..., lag:, :] += t
            gB[..., :C - lag, :] -= t
        return gq, gk, gB


def chunked_plain(q, k, v, state=None, chunk: int = 64):
    """chunked_decay with no decay (g = 0: no exp, no ratios), the state before each chunk an exclusive cumulative
    sum of the chunks' own states (no loop): o_i = q_i^T S + sum_{j<=i, same chunk} (q_i . k_j) v_j. Same arguments
    (less g) and result; the state after is a view of the chunks' sums unless a state was given. One token after a
    state (a decoding step) runs the recurrence's step itself."""
    b, h, n, dk = q.shape
    if n == 1 and state is not None:  # one decoding step: the state taken in, then read (no chunks, no mask)
        after = torch.baddbmm(state.flatten(0, 1), k.flatten(0, 1).transpose(-1, -2), v.flatten(0, 1))
        after = after.view(state.shape)
        return q @ after, after
    C = min(chunk, n)
    pad = -n % C
    # [b, h, m, C, ...]: one contiguous copy at most (padded, or a strided input made contiguous), which every
    # matmul below reads as a view
    q, k, v = (_chunks(t if pad or t.is_contiguous() else t.contiguous(), C, pad) for t in (q, k, v))
    future = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
    a = (q @ k.transpose(-1, -2)).masked_fill_(future, 0.0)  # [b, h, m, C, C]
    total = (k.transpose(-1, -2) @ v).cumsum(2)  # [b, h, m, dk, dv]: the state after each chunk
    before = F.pad(total[:, :, :-1], (0, 0, 0, 0, 1, 0))  # and before it
    if state is not None:
        before = before + state[:, :, None]
    o = (q @ before).add_(a @ v)
    after = total[:, :, -1] if state is None else total[:, :, -1] + state
    return o.reshape(b, h, -1, v.shape[-1])[:, :, :n], after


def recurrent_decay(q, k, v, g, state=None):
    """The recurrence itself, token by token (decoding: a few tokens at a time): same arguments and result as
    chunked_decay."""
    b, h, n, dk = q.shape
    s = q.new_zeros(b, h, dk, v.shape[-1]) if state is None else state
    out = []
    for t in range(n):
        a = g[:, :, t].exp()
        s = (a[..., None] if g.dim() == 4 else a[..., None, None]) * s + k[:, :, t, :, None] * v[:, :, t, None, :]
        out.append((q[:, :, t, None, :] @ s).squeeze(2))
    return torch.stack(out, 2), s


def parallel_decay(q, k, v, g):
    """The same outputs from a zero state in one piece, no loop (the export's form, a symbolic n): the [n, n]
    decay ratios exp(B_i - B_j), j <= i, with B the decay accumulated from the first token; per key channel for a
    vector decay ([n, n, dk] ratios: O(n^2 dk), only where the length is symbolic)."""
    n = q.shape[2]
    B = g.cumsum(2)
    future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    if g.dim() == 4:
        lag = (B[:, :, :, None, :] - B[:, :, None, :, :]).masked_fill(future[..., None], float("-inf"))
        a = (q[:, :, :, None, :] * k[:, :, None, :, :] * lag.exp()).sum(-1)
    else:
        a = (q @ k.transpose(-1, -2)) * (B[..., :, None] - B[..., None, :]).masked_fill(future, float("-inf")).exp()
    return a @ v
