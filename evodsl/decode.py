"""Decoding: a causal model run incrementally. `DecodeState` holds what each op keeps between calls (softmax
attention's K/V, ...) and how many positions have been seen; `EvoModel.decode(ids, state)` runs the new tokens
only, and `generate` is a loop of it. Each op's module reads `ctx.cache` (this state, or None for an ordinary
forward) and `ctx.offset` (the positions of its stream already seen), so one forward serves the full sequence, a
prefill of any length and a single step alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DecodeState:
    """What a model keeps between decoding calls: per module, the tensors it caches, and the
    number of tokens seen. `nbytes()` is the memory it holds."""

    seen: int = 0  # tokens of the input processed so far
    caches: dict = field(default_factory=dict)  # slot(ctx, module) -> tuple of tensors (K, V, ...)
    kept: dict = field(default_factory=dict)  # an encoder-decoder's bookkeeping: the shapes of the values computed
    #                                           at the prompt (one element each) and the source's padding mask

    def nbytes(self) -> int:
        """Bytes held by the ops' caches (each storage once); `kept` is bookkeeping, not counted (a padded
        source's mask: [b, n] bools)."""
        seen, total = set(), 0
        for tensors in self.caches.values():
            for t in tensors:
                if not isinstance(t, torch.Tensor):
                    continue
                key = t.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += t.untyped_storage().nbytes()
        return total


def slot(ctx, owner) -> tuple:
    """Where `owner` (a module) keeps its state in this call: the module, and which application of a shared
    repeat body runs it (`repeat(block, 12, shared=true)` runs one module 12 times, each with its own cache)."""
    return id(owner), ctx.extra.get("copy", ())


def append_kv(ctx, owner, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V of every position so far: the cached ones followed by these (the cache keeps the result)."""
    cache = ctx.cache.caches
    key = slot(ctx, owner)
    if key in cache:
        k0, v0 = cache[key]
        k, v = torch.cat((k0, k), dim=2), torch.cat((v0, v), dim=2)
    cache[key] = (k, v)
    return k, v


def pick_next(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
              generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row from its last logits [b, V]: the argmax, or a sample at `temperature` from the
    top_k tokens and the smallest set whose probability reaches top_p (nucleus)."""
    if not do_sample:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the tokens after the set has reached top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)
