"""RWKV's token shift (rnn(rwkv4), ffn(rwkv)): each position reads the previous token's input, the first one zeros
(or, decoding, the last token of the previous call, kept in the cache), and the layer mixes the two by learned
per-channel weights, mix x + (1 - mix) x_prev. A padded position's input is zeroed first, so that the first real
token of a left-padded row reads zeros, as alone."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...decode import slot


def keep_mask(ctx):
    """The padding mask the op must honour ([b, n] bool), or None (no padding, or right padding: a causal op's
    real tokens never read a later one)."""
    return None if ctx is None or ctx.mask is None or ctx.right_padded else ctx.mask


def previous(x: torch.Tensor, last) -> torch.Tensor:
    """x_prev [b, n, d]: x shifted one position later, `last` [b, d] (or zeros) first."""
    if last is None:
        return F.pad(x, (0, 0, 1, -1))  # one zero row first, the last row dropped (no slice of n - 1 to trace)
    return torch.cat((last[:, None].to(x.dtype), x[:, :-1]), 1)


def cached(ctx, owner):
    """(the cache slot of `owner` in this call, its state tuple or None); (None, None) when not decoding."""
    if ctx is None or ctx.cache is None:
        return None, None
    key = slot(ctx, owner)
    return key, ctx.cache.caches.get(key)


def mix(x, prev, mu):
    """mu x + (1 - mu) x_prev."""
    return prev + mu * (x - prev)
