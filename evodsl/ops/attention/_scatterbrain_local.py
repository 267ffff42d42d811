"""mha(scatterbrain)'s causal form (scatterbrain.py): the sparse correction on the local window, query i reading
keys i - w + 1 .. i (the authors' causal SBLocalAttention), beside the low-rank part's causal prefix sums.

The window runs in query blocks of w: block g's queries (positions g w .. g w + w - 1) read the previous block's
keys and their own, [w, 2w] scores masked to the band; G = ceil(n / w) + 1 blocks (the last past n, unread: a
floor torch.export divides, never 1), gathered by index so that one graph serves every n. Decoding keeps the
last w - 1 keys and values (K/V heads), the running sums [S z] of the features and their running scale."""
from __future__ import annotations

import torch

from ...decode import slot
from . import _kernelized as kern
from .performer import favor_logits


def window_correction(q, k, v, fq, fk, cqk, window: int, keep):
    """q, k, v [b, h, n, dh], the scaled features fq, fk [b, h, n, m] and their log constant cqk [b, h, n, 1]
    (K/V repeated to the query heads), keep [b, n] bool or None -> (sum_j S_ij [v_j 1] exp(-c_i) [b, h, n, dh + 1],
    c [b, h, n, 1]) over j in i - w + 1 .. i (not padded)."""
    b, h, n, dh = q.shape
    w, dev = window, q.device
    G = (n + 2 * w - 1) // w
    qpos = torch.arange(G * w, device=dev)  # [G w]: each query slot's position (past n: unread)
    kpos = (qpos.view(G, 1, w) + torch.tensor([-w, 0], device=dev).view(1, 2, 1)).flatten()  # [G 2w]
    qi, kj = qpos.view(G, w, 1), kpos.view(G, 1, 2 * w)
    ok = (kj <= qi) & (kj > qi - w) & (kj >= 0) & (kj < n)  # [G, w, 2w]
    if keep is not None:
        ok = ok & keep[:, kpos.clamp(0, n - 1)].view(b, 1, G, 1, 2 * w)
    qg, kg = qpos.clamp(max=n - 1), kpos.clamp(0, n - 1)

    def rows(t, idx, r):  # t [b, h, n, f] -> [b, h, G, r, f]
        return t.index_select(2, idx).unflatten(2, (G, r))

    s = (rows(q, qg, w) * dh ** -0.5) @ rows(k, kg, 2 * w).transpose(-1, -2)  # [b, h, G, w, 2w]
    s = s.masked_fill(~ok, float("-inf"))
    cs = rows(cqk, qg, w)
    c = torch.maximum(s.detach().amax(-1, keepdim=True), cs)  # finite: cs is
    dots = (rows(fq, qg, w) @ rows(fk, kg, 2 * w).transpose(-1, -2)).masked_fill(~ok, 0.0)
    S = (s - c).exp() - dots * (cs - c).exp()
    o = S @ kern.ones_column(rows(v, kg, 2 * w))  # [b, h, G, w, dh + 1]
    if not isinstance(n, int):  # export: gathered (a slice to a symbolic n leaves a guard torch.export cannot prove)
        first = torch.arange(n, device=dev)
        return o.flatten(2, 3).index_select(2, first), c.flatten(2, 3).index_select(2, first)
    return o.flatten(2, 3)[:, :, :n], c.flatten(2, 3)[:, :, :n]


def local_step(m, x, ctx):
    """Decoding: the new queries read the cached last w - 1 keys and their own (the window), and the running sums
    [S z] of phi(k) [v 1] scaled by the running max of the keys' logits (performer.py's step)."""
    q, k, v = m.qkv(x, ctx.offset)
    b, kvh, T, dh = k.shape
    mm = m.w.shape[0]
    old = ctx.cache.caches.get(slot(ctx, m))
    if old is None:
        old = (k[:, :, :0], v[:, :, :0], k.new_zeros(b, kvh, mm, dh + 1), k.new_full((b, kvh, 1, 1), -torch.inf))
    kc, vc, state, top = old
    uq, uk = favor_logits(q, m.w), favor_logits(k, m.w)
    cq = uq.amax(-1, keepdim=True)
    new_top = torch.maximum(top, uk.amax((-2, -1), keepdim=True))
    fq = (uq - cq).exp()
    low, state = kern.step(fq, (uk - new_top).exp(), v, state * (top - new_top).exp(), m.expand_kv)
    K, V = torch.cat((kc, k), 2), torch.cat((vc, v), 2)  # positions offset - P .. offset + T - 1
    P = kc.shape[2]
    i = torch.arange(P, P + T, device=x.device)[:, None]
    j = torch.arange(P + T, device=x.device)[None, :]
    ok = (j <= i) & (j > i - m.window)
    s = (q * dh ** -0.5) @ m.expand_kv(K).transpose(-1, -2)
    s = s.masked_fill(~ok, float("-inf"))
    cs = cq + m.expand_kv(new_top)
    c = torch.maximum(s.amax(-1, keepdim=True), cs)
    fk = (favor_logits(K, m.w) - new_top).exp()
    dots = (fq @ m.expand_kv(fk).transpose(-1, -2)).masked_fill(~ok, 0.0)
    o = ((s - c).exp() - dots * (cs - c).exp()) @ kern.ones_column(m.expand_kv(V)) + low * (cs - c).exp()
    drop = K.shape[2] - torch.sym_min(K.shape[2], m.window - 1)  # the last w - 1 stay
    ctx.cache.caches[slot(ctx, m)] = (K[:, :, drop:].clone(), V[:, :, drop:].clone(), state, new_top)
    return m.out(o[..., :-1] / o[..., -1:].clamp_min(torch.finfo(o.dtype).tiny))
