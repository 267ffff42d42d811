"""mha(combiner, mode=axial): Combiner-Axial's row-major form (the authors' axial_rowmajor, row_summary='none').

The sequence is a grid of m = ceil(n/s) rows of s positions; query i = (a, l) (row a, column l). Its own row is read
directly (causal: its columns <= l); every other row r (causal: r < a) is one region, reached through the token
(r, l) of the query's column: p(Omega_r|i) ~ exp(q_i.k_(r,l) / sqrt(dh)), and q(j|Omega_r) is the attention of
query (r, l) over its whole row r, so the region's value is that token's row-attention output
u_(r,l) = sum_{j in row r} softmax_j(q_(r,l).k_j / sqrt(dh)) v_j. One softmax over the s + m - 1 terms.
Each query reads a different set of summaries (its column's), so the scores are explicit matmuls (row:
[b, m, h, s, s]; column: [b, s, h, m, m]) joined into [b, m, h, s, s + m], not one SDPA call; the rows' own attention
(the summaries u) is one SDPA call. Grouped K/V heads are repeated to the query heads (u has one per query head).
In a right-padded row, or the last, shorter row, a query reads no summary through a column its row r lacks.
Choices: the region key is the column token's own key (the authors' row_summary='none'; their LM config projects
the row-attention output into a new key, 'proj', which adds layers the paper's equations do not have); the rows'
attention behind u is over the whole row (bidirectional inside a row, as theirs), also in causal models, where only
finished rows are read. The export (a symbolic n) runs `dense`; decoding, `axial_step` (one masked call over the
cached keys and summaries: O(n) a token, as softmax attention's cache).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def axial(mod, qx, kx, vx, length):
    """q, k, v [b, n, C] -> o [b, m s, h dh] (Combiner-Axial); length [b, 1]: each row's tokens, or None."""
    b, n, _ = qx.shape
    s, h, kv, dh, dev = mod.block, mod.heads, mod.kv_heads, mod.head_dim, qx.device
    m = (n + s - 1) // s if isinstance(n, int) else n // s + 2  # the export: 2 more rows, padding alone
    pos = torch.arange(m, device=dev)[:, None] * s + torch.arange(s, device=dev)  # [m, s]
    if length is None:
        L = n
        idx = pos.clamp(max=n - 1)
        qg, kg, vg = qx[:, idx], kx[:, idx], vx[:, idx]  # [b, m, s, C]
    else:
        L = length[:, :, None]  # [b, 1, 1]
        at, idx = torch.arange(b, device=dev)[:, None, None], torch.minimum(pos, L - 1)
        qg, kg, vg = qx[at, idx], kx[at, idx], vx[at, idx]
    real = pos[None] < L  # [1 | b, m, s]
    qb, kb, vb = (t.view(b * m, s, t.shape[-1] // dh, dh).transpose(1, 2) for t in (qg, kg, vg))  # [b m, ., s, dh]
    j = torch.arange(s, device=dev)
    rows = real.expand(b, m, s).reshape(b * m, 1, 1, s) | (j == 0)  # a row of padding alone reads its first
    u = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=rows, enable_gqa=kv != h)  # [b m, h, s, dh]
    if not isinstance(n, int):
        return dense(mod, qx, kx, vx, u.transpose(1, 2).reshape(b, m * s, h, dh), L)
    k, v = (t.view(b, m, s, kv, dh).transpose(2, 3) for t in (kg, vg))  # [b, m, kv, s, dh]
    if kv != h:  # each K/V head repeated for its query heads
        k, v = k.repeat_interleave(h // kv, dim=2), v.repeat_interleave(h // kv, dim=2)
    return combine(mod, qg.view(b, m, s, h, dh), k, v, u.view(b, m, h, s, dh), real)


def _bmm(x, y):
    """x [B1, B2, B3, M, K] @ y [B1, B2, B3, K, P], the batch axes folded with their sizes named (torch.matmul folds
    them with a -1, a division by a symbolic m that torch.export cannot prove exact)."""
    B1, B2, B3, M, K = x.shape
    P = y.shape[-1]
    if not all(isinstance(t, int) for t in (*x.shape, P)):  # export: the copies bmm makes, made first (a plain view)
        x, y = x.contiguous(), y.contiguous()
    return torch.bmm(x.reshape(B1 * B2 * B3, M, K), y.reshape(B1 * B2 * B3, K, P)).view(B1, B2, B3, M, P)


def combine(mod, q, k, v, u, real):
    """q [b, m, s, h, dh]; k, v [b, m, h, s, dh] (K/V heads repeated); u [b, m, h, s, dh]; real [1 | b, m, s] ->
    o [b, m s, h dh]: one softmax over each query's row keys and its column's summaries."""
    b, m, s, h, dh = q.shape
    dev = q.device
    qr = q.transpose(2, 3)  # [b, m, h, s, dh]
    col = (0, 3, 2, 1, 4)  # [b, m, h, s, dh] <-> [b, s, h, m, dh]
    row_scores = _bmm(qr, k.transpose(-1, -2))  # [b, m, h, s, s]
    col_scores = _bmm(qr.permute(col), k.permute(col).transpose(-1, -2)).permute(col)  # [b, m(a), h, s(l), m(r)]
    w = torch.cat((row_scores, col_scores), dim=-1).mul_(1.0 / math.sqrt(dh))
    del row_scores, col_scores
    a, r = torch.arange(m, device=dev), torch.arange(m, device=dev)
    i, j = torch.arange(s, device=dev)[:, None], torch.arange(s, device=dev)
    if mod.causal:  # its row up to itself; the rows before it
        direct, summ = (j <= i).expand(1, m, s, s), (r < a[:, None])[None, :, None, :].expand(1, m, s, m)
    else:  # its row's tokens (or itself, a padded query whose row has none); every other row holding its column
        direct = real[:, :, None, :] | ((j == i) & ~real[:, :, :, None])
        summ = (r != a[:, None])[None, :, None, :] & real.transpose(1, 2)[:, None]
        direct, summ = direct.expand(-1, m, s, s), summ.expand(-1, m, s, m)
    keep = torch.cat((direct, summ), dim=-1)[:, :, None]  # [1 | b, m, 1, s, s + m]
    w = w.masked_fill_(~keep, float("-inf")).softmax(-1)
    o = _bmm(w[..., :s], v) + _bmm(w[..., s:].permute(col), u.permute(col)).permute(col)  # [b, m, h, s, dh]
    return o.transpose(2, 3).reshape(b, m * s, h * dh)


def dense(mod, qx, kx, vx, u, L):
    """The export's form (a symbolic n, whose row count m would need divisions torch.export cannot prove): the
    same softmax as one SDPA call over 2n keys, every key twice, k_j with v_j (read where j is in the query's row)
    and k_j with u_j (where j is the query's column in another row), under an [n, 2n] mask: O(n^2), as
    blockwise's export. u [b, N, h, dh]: the row attention at the gathered positions; -> o [b, n, h dh]."""
    b, n, _ = qx.shape
    s, h, dh, dev = mod.block, mod.heads, mod.head_dim, qx.device

    def heads(t):  # [b, n, C] -> [b, h, n, dh]
        return mod.expand_kv(t.view(b, n, t.shape[-1] // dh, dh).transpose(1, 2))

    t = torch.arange(n, device=dev)
    i, j = t[:, None], t[None, :]
    ri, rj = torch.div(i, s, rounding_mode="floor"), torch.div(j, s, rounding_mode="floor")  # rows
    real = j[None] < (L[:, :, 0, None] if torch.is_tensor(L) else L)  # [1 | b, 1, n] keys that are tokens
    same_row, same_col = ri == rj, i - ri * s == j - rj * s
    if mod.causal:
        direct, summ = (same_row & (j <= i))[None], (same_col & (rj < ri))[None]
    else:
        mine = i[None] < (L[:, :, 0, None].transpose(1, 2) if torch.is_tensor(L) else L)  # [1 | b, n, 1] queries
        direct = (same_row & real) | ((i == j) & ~mine)
        summ = same_col & ~same_row & real
    keep = torch.cat((direct, summ), dim=-1)[:, None]  # [1 | b, 1, n, 2n]
    k = heads(kx)
    o = F.scaled_dot_product_attention(qx.view(b, n, h, dh).transpose(1, 2), torch.cat((k, k), 2),
                                       torch.cat((heads(vx), u[:, t].transpose(1, 2)), 2), attn_mask=keep)
    return o.transpose(1, 2).reshape(b, n, h * dh)


def row_summaries(mod, qx, kx, vx):
    """The summaries of whole rows: q, k, v [b, F s, C] -> u [b, h, F s, dh], each token's attention over its row."""
    b, f, _ = qx.shape
    s, h, dh = mod.block, mod.heads, mod.head_dim
    qb, kb, vb = (t.reshape(b * (f // s), s, t.shape[-1] // dh, dh).transpose(1, 2) for t in (qx, kx, vx))
    u = F.scaled_dot_product_attention(qb, kb, vb, enable_gqa=mod.kv_heads != h)  # [b F, h, s, dh]
    return u.view(b, f // s, h, s, dh).transpose(1, 2).reshape(b, h, f, dh)


def axial_step(mod, qx, kx, vx, start, old):
    """Decoding (causal) of new q, k, v [b, T, C] at positions start..: (o [b, h, T, dh], the cache). The cache: the
    finished rows' keys [b, kv, P, dh] and summaries u [b, h, P, dh] (P = F s positions), and the raw q, k, v of the
    unfinished row ([b, R, C], R < s). New queries read, in one call, the summaries of their column in earlier rows
    and the raw keys of their own row (up to themselves), under a [T, P + f + R] mask (f: the rows finished now)."""
    s, h, kv, dh = mod.block, mod.heads, mod.kv_heads, mod.head_dim
    b, T, _ = qx.shape
    kf, uf, qr, kr, vr = old
    base = start - kr.shape[1]
    qa, ka, va = torch.cat((qr, qx), 1), torch.cat((kr, kx), 1), torch.cat((vr, vx), 1)
    R = ka.shape[1]
    f = R // s * s
    un = row_summaries(mod, qa[:, :f], ka[:, :f], va[:, :f])

    def heads(t, n):  # k or v [b, n, kv dh] -> [b, h, n, dh]
        return mod.expand_kv(t.reshape(b, n, kv, dh).transpose(1, 2))

    t = torch.arange(start, start + T, device=qx.device)[:, None]
    p = torch.arange(base + f, device=qx.device)[None, :]  # the summaries' positions
    raw = base + torch.arange(R, device=qx.device)[None, :]
    keep = torch.cat(((p % s == t % s) & (p // s < t // s), (raw // s == t // s) & (raw <= t)), dim=1)
    keys = torch.cat((mod.expand_kv(kf), heads(ka[:, :f], f), heads(ka, R)), 2)
    vals = torch.cat((uf, un, heads(va, R)), 2)
    o = F.scaled_dot_product_attention(qx.view(b, T, h, dh).transpose(1, 2), keys, vals, attn_mask=keep)
    kf = torch.cat((kf, ka[:, :f].reshape(b, f, kv, dh).transpose(1, 2)), 2)
    return o, (kf, torch.cat((uf, un), 2), qa[:, f:].clone(), ka[:, f:].clone(), va[:, f:].clone())
