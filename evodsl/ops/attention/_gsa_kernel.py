"""Gated Slot Attention's first pass (mha(gsa), gsa.py): a gated linear recurrence whose decay acts on the *value*
side of the state (the m slots), and its recurrent step and one-piece form. The second pass decays its key side
(the slots again) and is _chunked_linear.py's chunked_decay as it stands.

Per head, keys and queries of width dk, "values" of width m (the slot write weights 1 - alpha_t), a state S_t
[dk, m] and a log decay g_t <= 0 per value channel (a_t = exp(g_t)):

    S_t = S_(t-1) diag(a_t) + k_t v_t^T,        o_t = q_t^T S_t        (S_0 given, zero by default)

which is S~_t = diag(a_t) S~_(t-1) + v_t k_t^T for the slot keys S~ = S^T [m, dk] of the paper (o_t = S~_t q_t).
Chunked, with B_i = g_1 + .. + g_i accumulated in the chunk (log space, per slot):

    o_i = exp(B_i) * (q_i^T S  +  sum_{j<=i} (q_i . k_j) (v_j * exp(-B_j)))
    S'  = S diag(exp(B_C)) + sum_j k_j (v_j * exp(B_C - B_j))^T

The same factorisation as GLA's, and the same way out where exp(-B_j) would leave the float range (a chunk's
summed log decay past -0.8 ln(max float) in some slot, _chunked_linear.factorisable): the ratios exp(B_i - B_j)
<= 1 one lag at a time (DecayValues), exact at any decay (its costs: _chunked_linear.py's docstring). The [C, C]
products of every chunk at once, a Python loop over chunks only. Tokens past n (the last chunk padded) have k = 0
and g = 0: they change neither the outputs nor the state.
"""
from __future__ import annotations

import torch

from ._chunked_linear import _chunks, factorisable, lag_ratios


def chunked_slot_decay(q, k, v, g, state=None, chunk: int = 64):
    """q, k [b, h, n, dk], v, g [b, h, n, m], the state before [b, h, dk, m] or None (zero) -> (o [b, h, n, m],
    the state after [b, h, dk, m])."""
    b, h, n, dk = q.shape
    C = min(chunk, n)
    pad = -n % C
    q, k, v, g = (_chunks(t, C, pad) for t in (q, k, v, g))  # [b, h, c, C, ...]
    B = g.cumsum(3)
    last = B[:, :, :, -1:]  # [b, h, c, 1, m]
    future = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
    a = (q @ k.transpose(-1, -2)).masked_fill(future, 0.0)  # [b, h, c, C, C]
    local = k.transpose(-1, -2) @ (v * (last - B).exp())  # [b, h, c, dk, m]
    carry = last.exp()  # [b, h, c, 1, m]: scales the state's columns
    s = q.new_zeros(b, h, dk, v.shape[-1]) if state is None else state
    before = []
    for keep, own in zip(carry.unbind(2), local.unbind(2)):  # a loop over chunks only
        before.append(s)
        s = keep * s + own
    if not torch.compiler.is_compiling() and factorisable(last):  # (compiled: no branch on the data)
        o = B.exp() * (q @ torch.stack(before, 2) + a @ (v * (-B).exp()))  # [b, h, c, C, m]
    else:  # exp(-B_j) would leave the float range: the ratios, each at most 1, one lag at a time
        o = B.exp() * (q @ torch.stack(before, 2)) + DecayValues.apply(a, v, B)
    return o.reshape(b, h, -1, v.shape[-1])[:, :, :n], s


class DecayValues(torch.autograd.Function):
    """o_im = sum_{j<=i} a_ij v_jm exp(B_im - B_jm), a [..., C, C] (read at j <= i), v, B [..., C, m] -> o [..., C,
    m]: the intra-chunk outputs of a decay on the value side where the factorisation would overflow (the value-side
    twin of _chunked_linear.DecayScores). Every ratio is at most 1; one lag j = i - l at a time, no [C, C, m]
    tensor, the ratios recomputed in the backward, only the inputs saved."""

    @staticmethod
    def forward(ctx, a, v, B):
        C = v.shape[-2]
        o = torch.zeros_like(v)
        for lag in range(C):
            o[..., lag:, :] += a.diagonal(-lag, -2, -1)[..., None] * v[..., :C - lag, :] * lag_ratios(B, lag)
        ctx.save_for_backward(a, v, B)
        return o

    @staticmethod
    def backward(ctx, grad):
        a, v, B = ctx.saved_tensors
        C = v.shape[-2]
        ga, gv, gB = torch.zeros_like(a), torch.zeros_like(v), torch.zeros_like(B)
        for lag in range(C):
            vj, aij = v[..., :C - lag, :], a.diagonal(-lag, -2, -1)[..., None]
            t = lag_ratios(B, lag).mul_(grad[..., lag:, :])
            ga.diagonal(-lag, -2, -1).copy_((t * vj).sum(-1))
            gv[..., :C - lag, :] += aij * t
            t.mul_(vj).mul_(aij)  # d o_im / d B_im = its term; d / d B_jm the negative
            gB[..., lag:, :] += t
            gB[..., :C - lag, :] -= t
        return ga, gv, gB


def recurrent_slot_decay(q, k, v, g, state=None):
    """The recurrence token by token (decoding): same arguments and result as chunked_slot_decay."""
    b, h, n, dk = q.shape
    s = q.new_zeros(b, h, dk, v.shape[-1]) if state is None else state
    out = []
    for t in range(n):
        s = s * g[:, :, t, None, :].exp() + k[:, :, t, :, None] * v[:, :, t, None, :]
        out.append((q[:, :, t, None, :] @ s).squeeze(2))
    return torch.stack(out, 2), s


def parallel_slot_decay(q, k, v, g):
    """The outputs from a zero state in one piece, no loop (the export's form, a symbolic n): [n, n, m] decay
    ratios exp(B_i - B_j), j <= i (O(n^2 m): only where the length is symbolic)."""
    n = q.shape[2]
    B = g.cumsum(2)
    future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    lag = (B[:, :, :, None, :] - B[:, :, None, :, :]).masked_fill(future[..., None], float("-inf")).exp()
    a = q @ k.transpose(-1, -2)  # [b, h, n, n]
    return (a[..., None] * v[:, :, None, :, :] * lag).sum(3)
