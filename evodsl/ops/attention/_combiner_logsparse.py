"""mha(combiner, mode=logsparse): Combiner-Logsparse (Ren et al. 2021, section 4.2; Figure 1 (E)).

The prefix of query i (keys 0..i, causal) is cut along the binary representation of m = i + 1: for every set bit l of
m, the aligned block of 2^l keys [(floor(m / 2^l) - 1) 2^l, floor(m / 2^l) 2^l); the blocks tile the prefix, largest
first, and the smallest ends at i. In each block the key nearest the query (its last) is read directly: these are the
log-sparse positions of Omega_i^0, i itself among them; the rest of the block, the span of 2^l - 1 keys between two
of them, is one region Omega_i^r, read through a summary as in Combiner-Fixed (combiner.py): its key the elementwise
max of its keys, k_Omega, and its value v_Omega = sum_{j in Omega} softmax_j(q_Omega . k_j / sqrt(dh)) v_j, q_Omega
the max of its queries (over the query heads of a K/V head too). One softmax per query over its direct keys and
summary keys, p~(j|i) and p(Omega|i) with one normaliser: at most log2(n) + 1 direct keys and as many summaries,
O(n log n d) in all (every aligned block's two summaries are computed once per level: n d per level).

Choices where the paper is silent:
- bidirectional: the mirror image on the suffix i+1..n-1: for every level l whose bit of i is 0, the aligned block
  just after i's block of 2^l, [(floor(i / 2^l) + 1) 2^l, (floor(i / 2^l) + 2) 2^l) (the blocks tile the suffix,
  smallest first, those starting past the row dropped), its first key read directly and the rest summarised;
- no log-size term by default: p(Omega|i) ~ exp(q_i . k_Omega / sqrt(dh)) as the paper's factorisation writes it,
  as the authors' logn layer (combiner/jax/model/layer.py); log_size=true adds log |Omega| (2^l - 1, a suffix span's
  count cut at the row's end) to the summary's logit: exp(q_i . k_Omega / sqrt(dh)) |Omega|, the mass of |Omega|
  keys equal to k_Omega (an additive float mask in place of the bool one);
- the authors' layer summarises whole aligned blocks and reads only i (and i - 1) directly; this follows the paper's
  text: the block's nearest key direct, the span between summarised;
- a span past the row's tokens (right padding, or n) is pooled over its tokens only and dropped when it has none;
  right padding equals each sequence alone (the blocks are aligned to the row start), left padding is refused.
The export (a symbolic n) runs LEVELS levels (n < 2^LEVELS) with floor(n / 2^l) + 2 blocks each, the extra ones
masked. Decoding caches the raw q, k, v and reads each new query's spans from them (O(n d) a token).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LEVELS = 16  # the export's levels: n < 65536


def _pool(mod, qg, kg, vg, real):
    """Spans q [b, S, w, h dh], k, v [b, S, w, kv dh]; real [1 | b, S, w] -> (k_Omega, v_Omega) [b, S, kv, dh]."""
    b, S, w, _ = qg.shape
    kv, dh, g = mod.kv_heads, mod.head_dim, mod.heads // mod.kv_heads
    qs = qg.reshape(b, S, w, kv, g, dh).amax((2, 4)).reshape(b * S, kv, 1, dh)  # [b S, kv, 1, dh]
    kb, vb = (t.reshape(b * S, w, kv, dh).transpose(1, 2) for t in (kg, vg))  # [b S, kv, w, dh]
    keep = (real | (torch.arange(w, device=qg.device) == 0)).expand(b, S, w).reshape(b * S, 1, 1, w)
    vs = F.scaled_dot_product_attention(qs, kb, vb, attn_mask=keep)
    return kb.amax(2).view(b, S, kv, dh), vs.reshape(b, S, kv, dh)


def _gather(x, idx, at):
    return x[:, idx] if at is None else x[at, idx]


def logsparse(mod, qx, kx, vx, length):
    """q, k, v [b, n, C] -> o [b, n, h dh]; length [b, 1]: each row's tokens (a right-padded bidirectional batch), or
    None."""
    b, n, _ = qx.shape
    h, kv, dh, dev = mod.heads, mod.kv_heads, mod.head_dim, qx.device
    eager = isinstance(n, int)
    K = max(n, 2).bit_length() if eager else LEVELS
    L = n if length is None else length  # [b, 1] or n
    at = None if length is None else torch.arange(b, device=dev)[:, None, None]
    t = torch.arange(n, device=dev)
    kt, vt = [kx.view(b, n, kv, dh)], [vx.view(b, n, kv, dh)]  # the keys' (values') table: tokens, then summaries
    idx_d, idx_s, keep_d, keep_s, logs, off = [], [], [], [], [], n
    sides = (0,) if mod.causal else (0, 1)
    for l in range(K):
        B = 1 << l
        S = (n + B - 1) // B if eager else n // B + 2  # the level's blocks
        for side in sides:  # 0: the prefix block of bit l of i + 1; 1: the suffix block of bit l of i (a 0)
            if side == 0:
                sel, c = (t + 1) // B % 2 == 1, (t + 1) // B - 1
                p = c * B + B - 1  # its last key, read directly
                ok = sel[None]  # [1, n]
            else:
                sel, c = t // B % 2 == 0, t // B + 1
                p = c * B  # its first key
                ok = sel[None] & (p < L)  # [1 | b, n]
            idx_d.append(p.clamp(max=n - 1))
            keep_d.append(ok)
            if l == 0:  # spans of 2^0 - 1 keys
                continue
            span = torch.arange(S, device=dev)[:, None] * B + torch.arange(B - 1, device=dev) + side  # [S, B - 1]
            real = span[None] < (L if length is None else L[:, :, None])  # [1 | b, S, B - 1]
            pos = span.clamp(max=n - 1) if length is None else torch.minimum(span, L[:, :, None] - 1)
            k_om, v_om = _pool(mod, _gather(qx, pos, at), _gather(kx, pos, at), _gather(vx, pos, at), real)
            kt.append(k_om)
            vt.append(v_om)
            idx_s.append(off + c.clamp(max=S - 1))
            keep_s.append(ok & (c * B + side < L) if side else ok)  # a suffix span holding a token
            if mod.log_size:  # log |Omega|: 2^l - 1 keys, a suffix span's cut at the row's end
                end = ((c + 1) * B - 1 if not side else ((c + 1) * B).clamp(max=n) if length is None
                       else torch.minimum((c + 1) * B, L))  # past the span's last key: [n] or [b, n]
                logs.append((end - c * B - side).clamp(min=1).to(qx.dtype).log().expand(1 if length is None else b, n))
            off = off + S
    idx = torch.stack(idx_d + idx_s, 1)  # [n, J]: each query's direct keys, then its summaries, in the table
    J = idx.shape[1]
    keys, vals = (torch.cat(tab, 1)[:, idx] for tab in (kt, vt))  # [b, n, J, kv, dh]
    keep = torch.stack([m.expand(1 if length is None else b, n) for m in keep_d + keep_s], -1)  # [1 | b, n, J]
    if mod.log_size:  # an additive mask: 0 on the direct keys, log |Omega| on the summaries, -inf off
        zero = qx.new_zeros(1 if length is None else b, n, len(idx_d))
        keep = torch.cat((zero, torch.stack(logs, -1)), -1).masked_fill(~keep, float("-inf"))
    q = qx.view(b * n, 1, h, dh).transpose(1, 2)  # [b n, h, 1, dh]
    o = F.scaled_dot_product_attention(q, keys.view(b * n, J, kv, dh).transpose(1, 2),
                                       vals.view(b * n, J, kv, dh).transpose(1, 2),
                                       attn_mask=keep.expand(b, n, J).reshape(b * n, 1, 1, J), enable_gqa=kv != h)
    return o.reshape(b, n, h * dh)  # reshape: on CUDA the kernel may lay o out otherwise


def logsparse_step(mod, qx, kx, vx, start, old):
    """Decoding (causal) of new q, k, v [b, T, C] at positions start..: (o [b, h, T, dh], the cache). The cache: the
    raw q, k, v of every position so far ([b, start, C]); each new query pools its own spans from them."""
    b, T, _ = qx.shape
    h, kv, dh, dev = mod.heads, mod.kv_heads, mod.head_dim, qx.device
    if old is not None:
        qx, kx, vx = (torch.cat((o, x), 1) for o, x in zip(old, (qx, kx, vx)))
    N = kx.shape[1]
    t = torch.arange(start, start + T, device=dev)
    keys, vals, keep, logs = [], [], [], []
    kh, vh = kx.view(b, N, kv, dh), vx.view(b, N, kv, dh)
    for l in range(max(N, 2).bit_length()):
        B = 1 << l
        sel, c = (t + 1) // B % 2 == 1, (t + 1) // B - 1
        p = (c * B + B - 1).clamp(min=0)
        keys.append(kh[:, p])
        vals.append(vh[:, p])
        keep.append(sel)
        logs.append(0.0)
        if l == 0:
            continue
        span = (c.clamp(min=0) * B)[:, None] + torch.arange(B - 1, device=dev)  # [T, B - 1]
        k_om, v_om = _pool(mod, qx[:, span], kx[:, span], vx[:, span], torch.ones(1, 1, B - 1, dtype=torch.bool,
                                                                                     device=dev))
        keys.append(k_om)
        vals.append(v_om)
        keep.append(sel)
        logs.append(math.log(B - 1))  # log |Omega| (mod.log_size)
    J = len(keys)
    k, v = (torch.stack(a, 2).view(b * T, J, kv, dh).transpose(1, 2) for a in (keys, vals))
    q = qx[:, -T:].reshape(b * T, 1, h, dh).transpose(1, 2)
    mask = torch.stack(keep, -1)  # [T, J]
    if mod.log_size:
        mask = qx.new_tensor(logs).expand(T, J).masked_fill(~mask, float("-inf"))
    mask = mask.expand(b, T, J).reshape(b * T, 1, 1, J)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv != h)  # [b T, h, 1, dh]
    return o.reshape(b, T, h, dh).transpose(1, 2), (qx, kx, vx)
