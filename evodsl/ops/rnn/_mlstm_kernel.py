"""The mLSTM cell of xLSTM (Beck et al. 2024, arXiv:2405.04517, section 2.3 and appendix A.3), chunked, with its
recurrent step and its one-piece parallel form. Per head, with q_t, k_t (already scaled by 1/sqrt(dh)), v_t, the
log forget gate l_t = log f_t and the input gate's pre-activation i~_t (i_t = exp(i~_t)):

    C_t = f_t C_(t-1) + i_t k_t v_t^T,    n_t = f_t n_(t-1) + i_t k_t,    h_t = q_t C_t / max(|q_t . n_t|, 1)

held stabilised: m_t = max(l_t + m_(t-1), i~_t) (m_0 = 0 with the zero state), C'_t = C_t exp(-m_t), n'_t likewise,
so that h_t = q_t C'_t / max(|q_t . n'_t|, exp(-m_t)): the same number for any m (m only keeps exp finite; it is
taken without a gradient, which it does not have: the result does not depend on it).

The chunked form: in chunks of C tokens, with b_i = l_1 + .. + l_i the log decay accumulated in the chunk, the weight
of token j <= i at token i is log D_ij = b_i - b_j + i~_j, that of the state before is b_i + m_prev, and
m_i = max(b_i + m_prev, max_j log D_ij) (the recurrent m_t itself):

    h_i = [exp(b_i + m_prev - m_i) q_i C'_prev + sum_j exp(log D_ij - m_i) (q_i . k_j) v_j] / max(|den_i|, exp(-m_i))

with den_i the same sums with n'_prev and 1 in place of C'_prev and v_j. Into the state: with w_j = b_C - b_j + i~_j
and w* = max_j w_j, m' = max(b_C + m_prev, w*), C'' = exp(b_C + m_prev - m') C'_prev + exp(w* - m') sum_j
exp(w_j - w*) k_j v_j^T (every exponent <= 0). The intra-chunk [C, C] blocks of all chunks run at once; a Python
loop over the ceil(n / C) chunks carries (C', n', m): O(n C dh + n dh^2) time, no n x n tensor. Tokens past n (the
last chunk padded) and padded positions have i~ = -inf (they write nothing) and l = 0 (they decay nothing).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _chunks(t: torch.Tensor, C: int, pad: int, value: float = 0.0) -> torch.Tensor:
    """[b, h, n, ...] -> [b, h, m, C, ...], padded with `value` to m C tokens."""
    if pad:
        t = F.pad(t, (0, 0) * (t.dim() - 3) + (0, pad), value=value)
    b, h, n = t.shape[:3]
    return t.reshape(b, h, n // C, C, *t.shape[3:])


def zero_state(q, dv):
    b, h, _, dk = q.shape
    return q.new_zeros(b, h, dk, dv), q.new_zeros(b, h, dk), q.new_zeros(b, h)


def chunked_mlstm(q, k, v, logf, ig, state=None, chunk: int = 64):
    """q, k [b, h, n, dk], v [b, h, n, dv], logf, ig [b, h, n], the state (C' [b, h, dk, dv], n' [b, h, dk],
    m [b, h]) or None (zero) -> (h [b, h, n, dv], the state after)."""
    b, h, n, dk = q.shape
    C = min(chunk, n)
    pad = -n % C
    Cs, ns, ms = zero_state(q, v.shape[-1]) if state is None else state
    q, k, v, logf = (_chunks(t, C, pad) for t in (q, k, v, logf))
    ig = _chunks(ig, C, pad, float("-inf"))  # [b, h, m, C]
    B = logf.cumsum(-1)
    future = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
    logD = (B[..., :, None] - B[..., None, :] + ig[..., None, :]).masked_fill(future, float("-inf"))
    w = B[..., -1:] - B + ig  # the weights into the state at the chunk's end
    with torch.no_grad():  # the stabilisers: the result does not depend on them
        intra, wmax = logD.amax(-1), w.amax(-1).clamp(min=-1e30)  # [b, h, m, C], [b, h, m] (finite: a chunk of padding)
    kw = k * (w - wmax[..., None]).exp()[..., None]
    local_C = kw.transpose(-1, -2) @ v  # [b, h, m, dk, dv]
    local_n = kw.sum(-2)  # [b, h, m, dk]
    before = ([], [], [])
    for decay, top, lc, ln in zip(B[..., -1].unbind(2), wmax.unbind(2), local_C.unbind(2), local_n.unbind(2)):
        for store, val in zip(before, (Cs, ns, ms)):
            store.append(val)
        m_new = torch.maximum(decay.detach() + ms, top)
        keep, add = (decay + ms - m_new).exp(), (top - m_new).exp()
        Cs = keep[..., None, None] * Cs + add[..., None, None] * lc
        ns = keep[..., None] * ns + add[..., None] * ln
        ms = m_new
    C_prev, n_prev, m_prev = (torch.stack(t, 2) for t in before)  # [b, h, m, ...]
    m_i = torch.maximum(B.detach() + m_prev[..., None], intra)  # [b, h, m, C]
    carry = (B + m_prev[..., None] - m_i).exp()  # [b, h, m, C]
    s = (q @ k.transpose(-1, -2)) * (logD - m_i[..., None]).exp()  # [b, h, m, C, C]
    num = carry[..., None] * (q @ C_prev) + s @ v
    den = carry * (q * n_prev[..., None, :]).sum(-1) + s.sum(-1)
    out = num / torch.maximum(den.abs(), (-m_i).exp())[..., None]
    return out.reshape(b, h, -1, v.shape[-1])[:, :, :n], (Cs, ns, ms)


def recurrent_mlstm(q, k, v, logf, ig, state=None):
    """The recurrence token by token (decoding): the arguments and result of chunked_mlstm."""
    Cs, ns, ms = zero_state(q, v.shape[-1]) if state is None else state
    out = []
    for t in range(q.shape[2]):
        m_new = torch.maximum(logf[:, :, t] + ms, ig[:, :, t])
        f, i = (logf[:, :, t] + ms - m_new).exp(), (ig[:, :, t] - m_new).exp()
        kt, qt = k[:, :, t], q[:, :, t]
        Cs = f[..., None, None] * Cs + i[..., None, None] * kt[..., :, None] * v[:, :, t, None, :]
        ns = f[..., None] * ns + i[..., None] * kt
        ms = m_new
        den = torch.maximum((qt * ns).sum(-1).abs(), (-ms).exp())
        out.append((qt[..., None, :] @ Cs).squeeze(-2) / den[..., None])
    return torch.stack(out, 2), (Cs, ns, ms)


def parallel_mlstm(q, k, v, logf, ig):
    """The outputs from a zero state in one piece (the export's form, a symbolic n): xLSTM's stabilised parallel
    form, [n, n] log weights log D_ij = b_i - b_j + i~_j with b cumulative from the first token, m_i = max(b_i,
    max_j log D_ij) (the zero state's weight b_i with m_0 = 0, as in the chunked form)."""
    n = q.shape[2]
    B = logf.cumsum(-1)
    future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    logD = (B[..., :, None] - B[..., None, :] + ig[..., None, :]).masked_fill(future, float("-inf"))
    m_i = torch.maximum(B, logD.amax(-1)).detach()
    s = (q @ k.transpose(-1, -2)) * (logD - m_i[..., None]).exp()
    return (s @ v) / torch.maximum(s.sum(-1).abs(), (-m_i).exp())[..., None]
