"""RWKV's token shift (rnn(rwkv4), rnn(rwkv6), rnn(rwkv7), ffn(rwkv)): each position reads the previous token's input, the first one zeros
(or, decoding, the last token of the previous call, kept in the cache), and the layer mixes the two by learned
per-channel weights, mix x + (1 - mix) x_prev. A padded position's input is zeroed first, so that the first real
token of a left-padded row reads zeros, as alone. Also what the headed time mixes (rwkv6, rwkv7) share: their
shape rule and their inits' per-channel ramps."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...decode import slot
from ..registry import ShapeProblem, sequence_shape


def keep_mask(ctx):
    """The padding mask the op must honour ([b, n] bool), or None (no padding, or right padding: a causal op's
    real tokens never read a later one)."""
    return None if ctx is None or ctx.mask is None or ctx.right_padded else ctx.mask


def shift_input(x: torch.Tensor, ctx, owner):
    """Where every RWKV layer starts: (x with its padded positions zeroed, the padding mask or None, the cache slot
    of `owner` in this call and its state or None)."""
    keep = keep_mask(ctx)
    if keep is not None:
        x = x * keep[..., None].to(x.dtype)
    return (x, keep, *cached(ctx, owner))


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


def ramp(d: int, power: float) -> torch.Tensor:
    """(c / d)^power over the channels c, [1, 1, d]: the RWKV inits' per-channel ramps."""
    return (torch.arange(d, dtype=torch.float32) / d).pow(power).reshape(1, 1, d)


def headed_shape(op_id: str):
    """The shape rule of a headed RWKV time mix (rwkv6, rwkv7): causal only, d_model a multiple of head_size."""
    def shape(p, env):
        out = sequence_shape(p, env)
        if not env.causal:
            raise ShapeProblem(f"{op_id} is causal only: its recurrence runs forward in time", None,
                               "use it in a causal model (head(lm)), or a mixer for a bidirectional one")
        if env.d % p.head_size:
            raise ShapeProblem(f"d_model {env.d} is not a multiple of head_size {p.head_size}", "head_size",
                               "heads are head_size channels each: pick a divisor of d_model")
        return out
    return shape
