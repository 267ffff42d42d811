"""The interface of position schemes applied inside attention (rope, alibi): `attach()` returns one of these."""
from __future__ import annotations

import torch
from torch import nn


def refuse_own_score_options(p, env, scheme: str, scores: str) -> None:
    """A scheme that runs mha(softmax)'s scores itself (pos(deberta), pos(huang)): the attention options that
    change those scores, the residual scores and memory(xl), refused with the scheme's name and its scores."""
    from ..registry import ShapeProblem  # here, as below: the registry imports the position schemes' modules

    for field in ("softcap", "sink_logit", "talking", "collab", "qk_norm", "scale"):
        if getattr(p, field, None) not in (None, False):
            raise ShapeProblem(f"mha(softmax, {field}=...) has no form with {scheme}, whose scores are {scores}", field,
                               f"drop {field}=, or use another position scheme")
    if env.residual_scores or env.memory:
        raise ShapeProblem(f"{scheme} runs its own scores: residual(..., scores=true) and memory(xl) have no form "
                           "with it", None, "drop the residual scores / the memory, or use pos(xl_rel)")


def kernel_inputs(att, x: torch.Tensor, ctx):
    """What a scheme that runs a kernelized attention itself (pos(permute), pos(kernel_rpe), pos(equivariant_kernel))
    reads first: (decoding, start, q, k, v, key_mask, state): positions from the decoding offset (0 outside
    decoding), the attention's projections there, its key mask (none while decoding: the cache holds real tokens
    only) and the state its last call cached (None outside decoding or at the first call)."""
    from ...decode import slot

    decoding = ctx is not None and ctx.cache is not None
    start = ctx.offset if decoding else 0
    q, k, v = att.qkv(x, start)
    key_mask = None if decoding else att.key_mask(ctx)
    state = ctx.cache.caches.get(slot(ctx, att)) if decoding else None
    return decoding, start, q, k, v, key_mask, state


class InAttentionPosition(nn.Module):
    """rotate(q, k, offset) acts on q, k [b, h, n, dh] at positions offset..offset+n-1 (decoding: the new
    positions); bias(i, j) returns an additive score bias [h, *broadcast(i, j)] for query positions i and key
    positions j (integer tensors), or None."""

    def rotate(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0):
        return q, k

    def bind(self, ctx) -> None:
        """Called with the forward's Ctx before rotate/bias: a scheme whose state lives upstream (T5's shared
        table) takes it from there."""

    def bias(self, i: torch.Tensor, j: torch.Tensor):
        return None

    def dense(self, n: int, device):
        """bias(i, j) for every query i and key j in 0..n-1, [h, n, n] (or None)."""
        idx = torch.arange(n, device=device)
        return self.bias(idx[:, None], idx[None, :])

class UpstreamTablePosition(InAttentionPosition):
    """A scheme whose learned table lives on its pos node upstream, shared by every attention layer after it:
    the node's module leaves the table in ctx.extra[SCHEME], and each layer's instance binds it per forward (a
    reference, not a submodule: the table's parameters are the pos node's). The table gives bias(i, j)."""

    SCHEME = ""  # the variant's name, its ctx.extra key

    def __init__(self, p, heads: int, head_dim: int):
        super().__init__()
        if p.heads != heads:
            from ..registry import ShapeProblem
            raise ShapeProblem(f"pos({self.SCHEME}) has a table for heads={p.heads}, but the attention has {heads} "
                               "heads", "heads", f"give pos({self.SCHEME}, heads=...) the attention's heads (or bind heads)")
        self.__dict__["_table"] = None

    def bind(self, ctx) -> None:
        self.__dict__["_table"] = None if ctx is None else ctx.extra.get(self.SCHEME)

    def _bound(self):
        if self._table is None:
            raise RuntimeError(f"pos({self.SCHEME}): no table bound; the pos({self.SCHEME}) op runs before its "
                               "attention layers")
        return self._table

    def bias(self, i: torch.Tensor, j: torch.Tensor):
        return self._bound().bias(i, j)


class InAttentionStream(nn.Module):
    """On the stream, a position scheme applied inside attention is the identity: the attention layers
    downstream rotate q and k (rope) or add the bias (alibi)."""

    def __init__(self, params=None, env=None):
        super().__init__()

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        return x
