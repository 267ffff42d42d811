"""The explicit-score kernel of the attention modifiers that SDPA cannot apply (score soft-capping, attention
sinks, the learned sink logit), shared by mha(softmax) and mha(local).

Query t reads the keys r of its band, -hi <= t - r <= lo (softmax: lo = n - 1, hi = 0 causal or n - 1; local:
lo = w - 1, hi = 0 or w - 1), plus the sink tokens r < S that the band misses (causal: r <= t), with

    s_tr = q_t . k_r * scale,   softcap c:  s_tr <- c tanh(s_tr / c),
    o_t  = sum_r exp(s_tr) v_r / (sum_r exp(s_tr) + [sink logit] exp(a_h)).

Row blocks of B queries:
  - "full" layout (the band covers the sequence): one block at a time (no n x n tensor beyond a block's B x n),
    block [s, e) against keys 0 .. e-1 (causal: the later blocks skipped) or all n;
  - "band" layout: all nb blocks at once, [b, h, nb, B, S + K] scores (O(n (S + w)), linear in n): block c's
    queries against its K = B + lo + hi keys cB - lo .. cB + B - 1 + hi, an unfold of K and V zero-padded (the
    padding masked), with the S sink keys prepended (a copy per block); queries padded to nb B rows, cut.
    One batched form, not a loop: a loop's slices of tensors that need a gradient would each allocate a
    full-size zero gradient in the backward (n^2 / B bytes in all).
The learned sink logit is one more column of the scores, a_h, with a zero value (gpt-oss's "sinks"). A position
scheme's additive bias (ALiBi's -m_h |t - r|) is added to the capped scores, before talking heads mix them; each
layout builds it for its own pairs (a block's, all blocks', each query's gathered keys), never n x n. A symbolic
n (export) runs _gathered: each query gathers its W = lo + hi + 1 band keys and the S sinks, [b, h, n, S + W].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...decode import append_kv, slot
from ..registry import require_right_padding
from ._talking import mix

FULL_BLOCK = 64  # queries per block when every query reads the whole causal prefix or sequence
MIN_BAND_BLOCK = 32


def layout(n: int, lo: int, hi: int, causal: bool):
    """("full", B, lo, hi) where the band covers the sequence, else ("band", B, lo, hi); lo, hi clipped."""
    lo, hi = min(lo, n - 1), min(hi, n - 1)
    if lo == n - 1 and (hi == 0 if causal else hi == n - 1):
        return "full", min(n, FULL_BLOCK), lo, hi
    return "band", min(n, max(MIN_BAND_BLOCK, lo, hi)), lo, hi


def _cap(sc: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """scale, then c tanh(. / c): in place without autograd (one block's scores the only tensor)."""
    if not sc.requires_grad:
        return sc.mul_(scale) if softcap is None else sc.mul_(scale / softcap).tanh_().mul_(softcap)
    if softcap is None:
        return sc * scale
    return torch.tanh(sc * (scale / softcap)) * softcap


def _weights(sc, allowed, logit, talk=None):
    """softmax over the allowed keys (and the sink logit's column, cut): [.., K]. talk (talking heads,
    _talking.py): the scores mixed across heads before the mask, the weights after the softmax."""
    if talk is not None:
        sc = mix(sc, talk.logits)
    sc = sc.masked_fill_(~allowed, float("-inf")) if not sc.requires_grad else sc.masked_fill(~allowed, float("-inf"))
    if logit is None:
        w = sc.softmax(-1)
    else:
        h = sc.shape[1]
        col = logit.view(1, h, *[1] * (sc.dim() - 2)).to(sc.dtype).expand(*sc.shape[:-1], 1)
        w = torch.cat((sc, col), -1).softmax(-1)[..., :-1]
    return w if talk is None else mix(w, talk.weights)


def _own_fallback(allowed, own_col):
    """A query left with no key (padding) reads its own (own_col [Bq] its column), so every row is finite."""
    cols = torch.arange(allowed.shape[-1], device=allowed.device)
    own = cols == own_col[:, None]
    return allowed | (own & ~allowed.any(-1, keepdim=True))


def _biased(sc, bias, i, j):
    """The scores plus a position scheme's bias(i, j) [h, ...] (ALiBi's), after the cap: in place without autograd."""
    if bias is None:
        return sc
    add = bias(i, j).to(sc.dtype)
    return sc.add_(add) if not sc.requires_grad else sc + add


def scored_attention(q, k, v, lo: int, hi: int, causal: bool, scale: float, softcap: float | None = None,
                     sinks: int = 0, logit=None, key_mask=None, talk=None, bias=None) -> torch.Tensor:
    """q, k, v [b, h, n, dh] (K/V heads already expanded) -> o [b, h, n, dh]; key_mask bool [b, n] (False =
    padding) takes padded keys out; talk: talking heads' mixing matrices (_talking.py); bias(i, j): a position
    scheme's additive score bias [h, ...] for query positions i and key positions j (after the cap)."""
    b, h, n, dh = q.shape
    if not isinstance(n, int) or torch.jit.is_tracing():
        return _gathered(q, k, v, lo, hi, causal, scale, softcap, sinks, logit, key_mask, talk, bias)
    form, B, lo, hi = layout(n, lo, hi, causal)
    dev = q.device
    if form == "full":  # row blocks, one at a time
        # contiguous [b, h, n, dh]: every block's slices are then matmul operands as they are (no per-block copies)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o = q.new_empty(b, n, h, dh).transpose(1, 2)  # laid out as o_proj reads it
        for s in range(0, n, B):
            e = min(s + B, n)
            K = e if causal else n
            i, j = torch.arange(s, e, device=dev)[:, None], torch.arange(K, device=dev)[None, :]
            allowed = j <= i if causal else torch.ones(e - s, K, dtype=torch.bool, device=dev)
            if key_mask is not None:
                allowed = _own_fallback(allowed & key_mask[:, None, None, :K], i[:, 0])
            sc = _biased(_cap(q[:, :, s:e] @ k[:, :, :K].transpose(-1, -2), scale, softcap), bias, i, j)
            w = _weights(sc, allowed, logit, talk)
            del sc, allowed
            o[:, :, s:e] = w @ v[:, :, :K]
            del w
        return o
    # the band: every block at once, [b, h, nb, B, S + K] (O(n (S + w)): no per-block slice of a tensor that
    # needs a gradient, whose backward would allocate a full-size zero gradient per block)
    S, nb = min(sinks, n), -(-n // B)
    K = B + lo + hi
    qb = (F.pad(q, (0, 0, 0, nb * B - n)) if nb * B > n else q.contiguous()).view(b, h, nb, B, dh)
    kb, vb = (F.pad(t, (0, 0, lo, nb * B - n + hi)).unfold(2, K, B).transpose(-1, -2) for t in (k, v))
    i = torch.arange(nb * B, device=dev).view(nb, B, 1)
    j = (torch.arange(nb, device=dev) * B - lo).view(nb, 1, 1) + torch.arange(K, device=dev)  # [nb, 1, K]
    allowed = (i - j <= lo) & (j - i <= hi) & (j >= 0) & (j < n)
    if S:
        js = torch.arange(S, device=dev).view(1, 1, S)
        band = (i - js <= lo) & (js - i <= hi)
        allowed = torch.cat(((~band & (js <= i)) if causal else ~band, allowed.expand(nb, B, K)), -1)
        kb = torch.cat((k[:, :, None, :S].expand(b, h, nb, S, dh), kb), 3)
        vb = torch.cat((v[:, :, None, :S].expand(b, h, nb, S, dh), vb), 3)
        j = torch.cat((js.expand(nb, 1, S), j), -1)
    cols = torch.arange(allowed.shape[-1], device=dev)
    own = cols == (i - (torch.arange(nb, device=dev) * B - lo).view(nb, 1, 1) + S)  # query t's own key
    allowed = allowed | (own & (i >= n))  # padded query rows: any finite row, cut
    if key_mask is not None:
        keep = key_mask[:, j[:, 0].clamp(0, n - 1)]  # [b, nb, S + K]
        allowed = allowed & keep[:, None, :, None, :]
        allowed = allowed | (own & ~allowed.any(-1, keepdim=True))
    sc = _biased(_cap(qb @ kb.transpose(-1, -2), scale, softcap), bias, i, j)
    w = _weights(sc, allowed, logit, talk)
    del sc, allowed
    return (w @ vb).view(b, h, nb * B, dh)[:, :, :n]


def _gathered(q, k, v, lo, hi, causal, scale, softcap, sinks, logit, key_mask, talk, bias=None):
    """The same for a symbolic n (export): query t gathers keys t - lo .. t + hi (clamped, the outside masked)
    and the S sinks; softmax's band (lo = n - 1) is every key, masked."""
    b, h, n, dh = q.shape
    i = torch.arange(n, device=q.device)[:, None]
    if lo is None:  # every key
        j = torch.arange(n, device=q.device)[None, :].expand(n, n)
        inside = (j <= i) if causal else torch.ones_like(j, dtype=torch.bool)
        sc = _biased(_cap(q @ k.transpose(-1, -2), scale, softcap), bias, i, j)
        allowed = inside[None, None]
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, None, :]
            allowed = allowed | ((j == i) & ~allowed.any(-1, keepdim=True))
        return _weights(sc, allowed, logit, talk) @ v
    j = i + torch.arange(-lo, hi + 1, device=q.device)[None, :]  # [n, W]
    inside = (j >= 0) & (j < n)
    own = torch.zeros_like(inside).index_fill_(1, torch.tensor([lo], device=q.device), True)
    if sinks:
        js = torch.arange(sinks, device=q.device)[None, :].expand(n, sinks)
        extra = (js < n) & ((i - js > lo) | (js - i > hi))
        inside = torch.cat((extra & (js <= i) if causal else extra, inside), -1)
        own = torch.cat((torch.zeros_like(js, dtype=torch.bool), own), -1)
        j = torch.cat((js, j), -1)
    jc = j.clamp(0, n - 1)
    kg, vg = k[:, :, jc], v[:, :, jc]  # [b, h, n, W', dh]
    sc = _cap((q.unsqueeze(-2) @ kg.transpose(-1, -2)).squeeze(-2), scale, softcap)  # [b, h, n, W']
    sc = _biased(sc, bias, i, j)
    allowed = inside[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, jc][:, None]
        allowed = allowed | (own & ~allowed.any(-1, keepdim=True))
    w = _weights(sc, allowed, logit, talk)
    return (w.unsqueeze(-2) @ vg).squeeze(-2)


def scored_forward(m, x, ctx):
    """The forward of an attention module `m` with modifiers (m.softcap, m.sinks, m.sink_logit; m.window: None for
    softmax), from its projections."""
    if m.pos is not None:
        m.pos.bind(ctx)
    if ctx is not None and ctx.cache is not None:
        return m.out(_step(m, x, ctx))
    q, k, v = m.qkv(x)
    key_mask = m.key_mask(ctx)
    if m.sinks:
        require_right_padding(key_mask, f"mha({m.variant}, sinks={m.sinks})",
                              "its sink tokens are each row's first positions, which left padding moves")
    n = x.shape[1]
    lo, hi = bounds(m, n)
    o = scored_attention(q, m.expand_kv(k), m.expand_kv(v), lo, hi, m.causal, m.score_scale, m.softcap, m.sinks,
                         m.sink_logit, key_mask, getattr(m, "talking", None), score_bias(m))
    return m.out(o)


def score_bias(m):
    """The bias(i, j) of m's position scheme where it has one (ALiBi's), else None (none, or one that turns q, k)."""
    from ..position._inattention import InAttentionPosition

    pos = m.pos
    return None if pos is None or type(pos).bias is InAttentionPosition.bias else pos.bias


def bounds(m, n):
    """(lo, hi) of the band: local's window, or softmax's every key (None for lo in a symbolic n's export)."""
    if m.window is None:
        if not isinstance(n, int):
            return None, None
        return n - 1, (0 if m.causal else n - 1)
    return m.window - 1, (0 if m.causal else m.window - 1)


def _step(m, x, ctx):
    """Decoding (causal): the new queries (positions start..) against the cached keys and their own. softmax
    keeps every key; local keeps the first S keys (the sinks) and the last w, so the cache holds
    min(t, S) + min(t, w) keys after t positions (the sinks again in the window while t < S + w, masked there)."""
    start, T = ctx.offset, x.shape[1]
    q, k, v = m.qkv(x, start)
    i = torch.arange(start, start + T, device=x.device)[:, None]
    if m.window is None:
        k, v = append_kv(ctx, m, k, v)
        j = torch.arange(start + T, device=x.device)[None, :]
        allowed = j <= i
        keys = j
    else:  # local: the sink list (the first S <= sinks keys) and the window list (the last w, then the new ones)
        key = slot(ctx, m)
        old = ctx.cache.caches.get(key)
        ks, vs, kw, vw = old if old is not None else (k[:, :, :0],) * 2 + (k[:, :, :0],) * 2
        S = ks.shape[2]
        add = min(m.sinks, start + T) - S  # new positions that are sinks (0 once S = sinks)
        kn, vn = k, v
        k, v = torch.cat((kw, kn), 2), torch.cat((vw, vn), 2)
        first = start + T - k.shape[2]  # the window list's first position
        j = torch.arange(first, start + T, device=x.device)[None, :]
        js = torch.arange(S, device=x.device)[None, :]
        allowed = torch.cat(((js < first).expand(T, S),  # a sink not in the window list (always before i)
                             (j <= i) & ((j > i - m.window) | (j < m.sinks))), -1)
        drop = k.shape[2] - min(k.shape[2], m.window)
        ctx.cache.caches[key] = (torch.cat((ks, kn[:, :, :add]), 2), torch.cat((vs, vn[:, :, :add]), 2),
                                 k[:, :, drop:].clone(), v[:, :, drop:].clone())
        k, v = torch.cat((ks, k), 2), torch.cat((vs, v), 2)
        keys = torch.cat((js, j), -1)
    sc = _biased(_cap(q @ m.expand_kv(k).transpose(-1, -2), m.score_scale, m.softcap), score_bias(m), i, keys)
    return _weights(sc, allowed, m.sink_logit, getattr(m, "talking", None)) @ m.expand_kv(v)


def head_scale(dh: int, scale: float | None) -> float:
    return scale if scale is not None else 1 / math.sqrt(dh)
