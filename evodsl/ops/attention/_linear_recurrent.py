"""What the chunked linear recurrences (retention, gla, deltanet, gated_deltanet) share: the causal-only shape rule
and the module's frame, which runs a variant's q, k, v and gates through the chunked kernel (training, a prompt),
the recurrent step (decoding) or the one-piece parallel form (a symbolic n: the ONNX export, where a loop over
chunks cannot be traced), and hands the result to the variant's output (norm, gate, o_proj).

Padding: a padded position's key is zeroed (and its write strength beta), so it adds nothing to the state;
its decay still applies, which under left padding decays a state that is still zero: each sequence's outputs
are its own. A causal op on a right-padded batch keeps its fast path (AttentionBase.key_mask): the padded
positions come after every token.
"""
from __future__ import annotations

import torch
from torch import nn

from ..registry import OpEnv, ShapeProblem
from ...decode import slot
from ._chunked_delta import chunked_delta, parallel_delta, recurrent_delta
from ._chunked_linear import chunked_decay, parallel_decay, recurrent_decay
from ._common import AttentionBase, AttentionParams, weightless_shape


def recurrent_shape(op_id: str, even: bool = False):
    """attention_shape without dropout= (no weights are formed), causal models only; `even`: a head width the
    rotation can pair up."""
    base = weightless_shape(op_id)

    def shape(p: AttentionParams, env: OpEnv):
        if not env.causal:
            raise ShapeProblem(f"{op_id} is causal only: a state carried forward over the tokens, and the paper "
                               "gives no bidirectional form", hint="use it in a causal model (causal=true)")
        out = base(p, env)
        dh = p.head_dim or env.d // p.heads
        if even and getattr(p, "rotate", False) and dh % 2:
            raise ShapeProblem(f"{op_id} rotates pairs of channels, but a head is {dh} wide (odd)", "head_dim",
                               "set an even head_dim, or rotate=false")
        return out
    return shape


class RecurrentAttention(AttentionBase):
    """The frame: a subclass gives `features(x, ctx, offset)` -> (q, k, v [b, h, n, d*], g (log decay [b, h, n] or
    [b, h, n, dk], or None), beta ([b, h, n], the delta rule's, or None)) and `finish(x, o [b, h, n, dv])` -> y."""

    delta = False  # the delta rule's kernel (beta given), else the decay kernel

    def __init__(self, p: AttentionParams, env: OpEnv):
        super().__init__(p, env)
        self.chunk = p.chunk

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        cache = ctx.cache if ctx is not None else None
        q, k, v, g, beta = self.features(x, ctx, ctx.offset if cache is not None else 0)
        mask = self.key_mask(ctx)
        if mask is not None:  # a padded position writes nothing into the state
            keep = mask[:, None, :].to(k.dtype)
            k = k * keep[..., None]
            beta = None if beta is None else beta * keep
        args = (q, k, v, beta, g) if self.delta else (q, k, v, g)
        if cache is not None:
            key = slot(ctx, self)
            old = cache.caches.get(key)
            step = (recurrent_delta if self.delta else recurrent_decay) if x.shape[1] == 1 else \
                (lambda *a, state: (chunked_delta if self.delta else chunked_decay)(*a, state, self.chunk))
            o, state = step(*args, state=None if old is None else old[0])
            cache.caches[key] = (state,)
        elif not isinstance(x.shape[1], int):
            o = (parallel_delta if self.delta else parallel_decay)(*args)
        else:
            o, _ = (chunked_delta if self.delta else chunked_decay)(*args, None, self.chunk)
        return self.finish(x, o)


class HeadNorm(nn.Module):
    """A norm over each head's channels (RMSNorm or LayerNorm, a learned scale per channel, shared by the heads:
    fla's g_norm), on [b, h, n, dv]."""

    def __init__(self, width: int, rms: bool, eps: float = 1e-5):
        super().__init__()
        self.weight, self.rms, self.eps = nn.Parameter(torch.ones(width)), rms, eps

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        if not self.rms:
            o = o - o.mean(-1, keepdim=True)
        return o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
