"""The sums of the Attention Free Transformer (Zhai et al. 2021), shared by mixer(aft) and mixer(daft).

Per channel c, with a learned position bias w_{t,r} (no channels):

    Y_t = sigmoid(Q_t) * N_t / D_t,   N_t = sum_r exp(K_r + w_{t,r}) V_r,   D_t = sum_r exp(K_r + w_{t,r})

(r over every position; causal: r <= t). exp(K + w) = exp(K) exp(w): the keys' exponentials are taken once per
position and combined with exp(w) by a matmul (full) or along the diagonals of a band (local, conv), so no
[n, n, d] tensor exists. Numerics: the per-channel maximum of K over the positions (the real ones, under a
padding mask) is subtracted before exp, and so is each row's maximum of w (local, conv: of max(0, w), as w is 0
outside the band); both cancel between N and D. All exponentials are then <= 1 (no overflow at any scale of K);
a channel whose keys spread over more than the dtype's exp range (~87 in float32) can still underflow.

The functions take K and V of the positions 0..T-1 and return N and D for the query rows p0..T-1 (p0 > 0: the
new tokens of a decoding step against the cached ones; the forward is p0 = 0).
"""
from __future__ import annotations

import torch


def exp_keys(k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None):
    """exp(K - max K) and exp(K - max K) * V, [b, T, d]; padded keys (keep False) give 0. The maxima are constants
    to autograd (the result does not depend on them), so nothing is kept to differentiate them."""
    if keep is not None:
        k = k.masked_fill(~keep[:, :, None], float("-inf"))
        m = k.detach().amax(1, keepdim=True).clamp_min(torch.finfo(k.dtype).min)  # all padding: finite
    else:
        m = k.detach().amax(1, keepdim=True)
    e = (k - m).exp_()
    return e, e * v


def global_sums(e: torch.Tensor, ev: torch.Tensor, causal: bool, p0: int = 0):
    """sum_r exp(K_r) V_r and sum_r exp(K_r): over all r ([b, 1, d]), or causal over r <= t for t >= p0."""
    if not causal:
        return ev.sum(1, keepdim=True), e.sum(1, keepdim=True)
    if p0 == 0:
        return ev.cumsum(1), e.cumsum(1)
    first = ev[:, :p0].sum(1, keepdim=True), e[:, :p0].sum(1, keepdim=True)
    return torch.cumsum(ev[:, p0:], 1).add_(first[0]), torch.cumsum(e[:, p0:], 1).add_(first[1])


def full_sums(w: torch.Tensor, e: torch.Tensor, ev: torch.Tensor, causal: bool, p0: int = 0):
    """AFT-full: w [T - p0, T] (the bias rows of the queries p0..T-1 against every key), E = exp(w - its row
    maximum) (causal: over r <= t, and 0 above), N = E (exp(K) V), D = E exp(K): matmuls, O(n^2 d)."""
    if causal:
        rows, cols = w.shape[-2:]
        t = torch.arange(p0, p0 + rows, device=w.device)[:, None]
        w = w.masked_fill(torch.arange(cols, device=w.device)[None, :] > t, float("-inf"))
    E = (w - w.detach().amax(-1, keepdim=True)).exp_()
    del w  # the masked copy (causal) dies before the matmuls
    E = E.expand(ev.shape[0], *E.shape)  # a batch of one matrix (stride 0): bmm reads it in place
    return torch.bmm(E, ev), torch.bmm(E, e)


def band_sums(coef: torch.Tensor, scale: torch.Tensor, offsets: list, e: torch.Tensor, ev: torch.Tensor,
              causal: bool, p0: int = 0, per_row: bool = True):
    """AFT-local and AFT-conv: w_{t,t+o} for the offsets o of a band, 0 outside it, so that

        N_t = sum_r exp(K_r) V_r + sum_o (exp(w_{t,t+o}) - 1) exp(K_{t+o}) V_{t+o}     (and D_t alike)

    With mu = max(0, max_o w) (per row, or per head), both terms are multiplied by exp(-mu): `scale` = exp(-mu),
    coef[..., j] = exp(w_j - mu) - exp(-mu). per_row: coef [T - p0, len(offsets)] and scale [T - p0, 1] (a bias
    per query position, local); else coef [len(offsets), d] and scale [d] (a kernel per channel, conv). The band
    runs as one multiply-add per offset on the shifted keys: O(n s d) time, nothing n x s x d."""
    T = e.shape[1]
    g_num, g_den = global_sums(e, ev, causal, p0)
    if causal:  # the running sums are new tensors: scaled in place (scale is a constant to autograd)
        num, den = g_num.mul_(scale), g_den.mul_(scale)
    else:  # [b, 1, d] times the scale, then a row per query, written into by the band
        num, den = ((g * scale).expand_as(e).contiguous() for g in (g_num, g_den))
    if not isinstance(T, int) or torch.compiler.is_exporting():
        return _band_padded(num, den, coef, offsets, e, ev, per_row)
    for j, o in enumerate(offsets):
        lo, hi = max(p0, -o), T - max(o, 0)  # query rows t with 0 <= t + o < T
        if lo >= hi:
            continue
        c = coef[lo - p0:hi - p0, j, None] if per_row else coef[j]
        num[:, lo - p0:hi - p0].addcmul_(ev[:, lo + o:hi + o], c)
        den[:, lo - p0:hi - p0].addcmul_(e[:, lo + o:hi + o], c)
    return num, den


def _band_padded(num, den, coef, offsets, e, ev, per_row):
    """The band for a symbolic length (torch.export, ONNX): exp(K) and exp(K) V padded with zeros by the widest
    offset, each offset a full-length window of them, so that no slice's length depends on the sign of T - o (a
    graph for every T). Two padded copies more than the slices of the eager form."""
    P = max(abs(o) for o in offsets)
    T = e.shape[1]
    ep, evp = (torch.nn.functional.pad(t, (0, 0, P, P)) for t in (e, ev))
    for j, o in enumerate(offsets):
        c = coef[:, j, None] if per_row else coef[j]
        num = num.addcmul(evp[:, P + o:P + o + T], c)
        den = den.addcmul(ep[:, P + o:P + o + T], c)
    return num, den
