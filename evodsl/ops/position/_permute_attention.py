"""pos(permute) inside mha(linear) and mha(performer): the features permuted by P^i at their positions and the
causal decay r^(i-j) (permute.py has the equation). The attention's own feature map gives phi; this runs the rest."""
from __future__ import annotations

import math

import torch

from ..registry import is_symbolic
from ._inattention import InAttentionPosition, kernel_inputs
from ._permute_cost import permute_attention_cost


def cycles(perm: torch.Tensor):
    """A permutation σ of 0..F-1 as its cycles: (order, start, pos, length) [F] each, order listing every cycle's
    members c, σ(c), σ²(c), ... one cycle after another; channel c sits at start[c] + pos[c] in it, its cycle
    length[c] long. Then σ^t(c) = order[start[c] + (pos[c] + t) mod length[c]]."""
    F = perm.numel()
    order, start, pos, length = [], [0] * F, [0] * F, [0] * F
    seen = [False] * F
    for c0 in range(F):
        if seen[c0]:
            continue
        members, c = [], c0
        while not seen[c]:
            seen[c] = True
            members.append(c)
            c = int(perm[c])
        for i, c in enumerate(members):
            start[c], pos[c], length[c] = len(order), i, len(members)
        order += members
    return tuple(torch.tensor(t, dtype=torch.long) for t in (order, start, pos, length))


class PermuteRelative(InAttentionPosition):
    """Inside attention: the per-head permutations (as cycles) and log r, made once the attention's feature count
    is known (adopt)."""

    attends = True  # mha(linear) / mha(performer) hand their forward to attend(), their cost to attention_cost
    attention_cost = staticmethod(permute_attention_cost)
    check = staticmethod(lambda p, env: None)  # nothing to refuse in the attentions that list it (E302: the others)

    def __init__(self, p, heads: int, head_dim: int):
        super().__init__()
        self.p, self.heads = p, heads
        # log r per head, as numbers (the decay is made in the input's dtype, never rounded through float32)
        self.log_r = [math.log(p.r) if p.r is not None else -math.log1p(math.exp(-(2 + 3 * h / heads)))
                      for h in range(heads)]

    def adopt(self, att) -> None:
        """Called by the attention once built: F features per head (performer: its m; linear: dh)."""
        F = att.w.shape[0] if hasattr(att, "w") else att.head_dim
        g = torch.Generator().manual_seed(self.p.seed)
        tables = [cycles(torch.randperm(F, generator=g)) for _ in range(self.heads)]
        for name, i in (("order", 0), ("start", 1), ("pos", 2), ("length", 3)):
            self.register_buffer(name, torch.stack([t[i] for t in tables]))

    def powers(self, start, n, device) -> torch.Tensor:
        """σ_h^t(c) for t = start..start+n-1: [h, n, F] int64."""
        t = torch.arange(n, device=device) + start
        at = self.start[:, None, :] + (self.pos[:, None, :] + t[None, :, None]) % self.length[:, None, :]
        return self.order[:, None, :].expand(at.shape).gather(-1, at)

    def attend(self, att, x: torch.Tensor, ctx) -> torch.Tensor:
        from ..attention._chunked_linear import chunked_decay, parallel_decay, recurrent_decay
        from ..attention._kernelized import ones_column
        from ..attention.linear import FEATURE_MAPS
        from ...decode import slot

        decoding, start, q, k, v, key_mask, state = kernel_inputs(att, x, ctx)
        b, n = x.shape[0], x.shape[1]
        performer = hasattr(att, "w")
        if performer:  # exp of the logits less a constant per query / per key head (performer.py's stabilisation)
            fq, uk = att._query_features(q), att._key_logits(k)
            if key_mask is not None:
                uk.masked_fill_(~key_mask[:, None, :, None], -math.inf)
            top = uk.detach().amax((-2, -1), keepdim=True)
            if decoding:  # the running max: the state's earlier features rescaled to it
                old = top.new_full(top.shape, -math.inf) if state is None else state[1]
                top = torch.maximum(old, top)
                state = None if state is None else state[0] * att.expand_kv((old - top).exp())
            fk = uk.sub_(top).exp_()
        else:
            phi = FEATURE_MAPS[att.phi]
            fq, fk = phi(q), phi(k)
            if key_mask is not None:
                fk = fk * key_mask[:, None, :, None].to(fk.dtype)
        idx = self.powers(start, n, x.device).expand(b, -1, -1, -1)  # [b, h, n, F]
        fq, fk = fq.gather(-1, idx), att.expand_kv(fk).gather(-1, idx)
        vv = ones_column(att.expand_kv(v))
        if not att.causal:
            o = fq @ (fk.transpose(-1, -2) @ vv)
        else:
            g = torch.tensor(self.log_r, dtype=fq.dtype, device=fq.device)[None, :, None].expand(b, -1, n)
            if decoding:
                o, s = recurrent_decay(fq, fk, vv, g, state)
                ctx.cache.caches[slot(ctx, att)] = (s, top) if performer else s
            elif is_symbolic(x) or not isinstance(n, int):
                o = parallel_decay(fq, fk, vv, g)
            else:
                o, _ = chunked_decay(fq, fk, vv, g, chunk=att.chunk)  # the attention's chunk (64)
        num, den = o[..., :-1], o[..., -1:]
        o = num / den.clamp_min(torch.finfo(o.dtype).tiny) if performer else num / (den + att.eps)
        return att.out(o)

    def extra_repr(self) -> str:
        return f"r={'per head' if self.p.r is None else self.p.r}, seed={self.p.seed}"
