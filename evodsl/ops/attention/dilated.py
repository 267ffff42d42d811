"""mha(dilated, pattern=P, layer=l): the sparse connection patterns of Transformer on a Diet (Wang et al. 2020,
arXiv:2002.06170), as the authors' language models build them (scripts/language_model/transformer_model.py of
cgraywang/transformer-on-diet: _dilated_windowed_mask, _dilated_mem_windowed_mask, the cascade's _windowed_mask).

Layer l of a stack (layer=, counted from 0) lets query t read the keys t - o, o in a fixed offset set O_l:

    dilated:      O_l = {j d^l : 0 <= j < k}                      (WaveNet: kernel k, dilation d^l, d = base)
    dilated_mem:  O_l = union over l' <= l of {j d^l' : j < k}    (each layer also keeps the earlier layers' keys)
    cascade:      O_l = {0, 1, .., w m^l - 1}                      (a window growing by m = base a layer, w = window)

then per head o_t = sum_{o in O_l, o <= t} softmax(q_t . k_{t-o} / sqrt(dh)) v_{t-o}: O(n |O_l| d), with
|O_l| = k, l (k - 1) + 1 at most, and w m^l. Causal (the paper's models are language models); in a bidirectional
model the set is mirrored, t - o and t + o (our choice: the paper has no bidirectional form). Every set holds
o = 0: a query always reads its own key.

Computed in one gathered form, eager and exported alike (a symbolic n needs nothing else): each query's |O| keys
and values gathered by index ([b, kv, n, |O|, dh] copies, positions outside the sequence clamped and masked),
the query heads of a K/V head grouped against them, softmax over the |O|. Padding: padded keys masked (a query
with no key left reads its own). Decoding keeps the K/V of the last max(O) + 1 positions. No position scheme
inside; dropout= is refused.
"""
from __future__ import annotations

from typing import Literal

import sympy as sp
import torch
from pydantic import Field

from ...decode import slot
from ..cost import Cost, Symbols
from ..registry import Op, OpEnv, ShapeProblem, register
from ._common import AttentionBase, AttentionParams, attention_cost, head_symbols
from .isab import no_dropout_shape


class DilatedParams(AttentionParams):
    pattern: Literal["dilated", "dilated_mem", "cascade"] = Field("dilated", description="the connection pattern")
    layer: int = Field(0, ge=0, le=16, description="l: the layer's index in the stack, from 0")
    k: int = Field(3, ge=1, le=64, description="kernel: keys per dilation (dilated, dilated_mem)")
    base: int = Field(2, ge=1, le=16, description="d: the dilation is d^l (cascade: the window grows m = d-fold)")
    window: int = Field(1, ge=1, le=4096, description="w: cascade's window at layer 0")


def offsets(p: DilatedParams) -> list[int]:
    """The sorted offset set O_l (causal: query t reads t - o)."""
    if p.pattern == "cascade":
        return list(range(p.window * p.base ** p.layer))
    dilations = [p.base ** p.layer] if p.pattern == "dilated" else [p.base ** i for i in range(p.layer + 1)]
    return sorted({j * d for d in dilations for j in range(p.k)})


def signed_offsets(p: DilatedParams, causal: bool) -> list[int]:
    """What query t reads, t - o for o in the list: O_l causal, O_l and -O_l bidirectional."""
    o = offsets(p)
    return o if causal else sorted(set(o) | {-x for x in o})


MAX_WINDOW = 1 << 16


def dilated_shape(p: DilatedParams, env: OpEnv):
    """no_dropout_shape, and a cascade window of at most 65536 keys (each query gathers all of them)."""
    if p.pattern == "cascade" and p.window * p.base ** p.layer > MAX_WINDOW:
        raise ShapeProblem(f"mha(dilated, pattern=cascade): the window w m^l = {p.window} * {p.base}^{p.layer} is "
                           f"over {MAX_WINDOW} keys", "layer", "a smaller window=, base= or layer=; or mha(local)")
    return no_dropout_shape("mha(dilated)")(p, env)


class DilatedAttention(AttentionBase):
    def __init__(self, p: DilatedParams, env: OpEnv):
        super().__init__(p, env)
        self.deltas = signed_offsets(p, env.causal)
        self.span = max(self.deltas) + 1  # decoding: the positions a new query can reach back

    def forward(self, x, ctx):
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        q, k, v = self.qkv(x)
        n = q.shape[2]
        t = torch.arange(n, device=x.device)
        return self.o_proj(self.attend(q, k, v, t, t, self.key_mask(ctx)))

    def attend(self, q, k, v, t, pos, key_mask):
        """q [b, h, T, dh] at positions t [T]; k, v [b, kv, N, dh] at positions pos [N] (consecutive) -> o laid
        out for o_proj, [b, T, h dh]. key_mask: bool [b, N] (False = padding) or None."""
        b, h, T, dh = q.shape
        kv, N = k.shape[1], k.shape[2]
        off = torch.tensor(self.deltas, device=q.device)
        j = t[:, None] - off[None, :] - pos[0]  # [T, m]: each query's keys, as indices into k
        ok = (j >= 0) & (j < N)
        idx = j.clamp(0, N - 1)
        if key_mask is not None:  # padded keys out; a query left with none reads its own
            ok = ok & key_mask[:, idx]
            ok = ok | ((off == 0) & ~ok.any(-1, keepdim=True))
        kg, vg = k[:, :, idx], v[:, :, idx]  # [b, kv, T, m, dh]
        qg = q.unflatten(1, (kv, h // kv)).transpose(2, 3)  # [b, kv, T, g, dh]
        s = (qg @ kg.transpose(-1, -2)).mul_(dh ** -0.5)  # [b, kv, T, g, m]
        del kg
        mask = ~ok[:, None, :, None, :] if ok.dim() == 3 else ~ok[:, None, :]
        w = s.masked_fill_(mask, float("-inf")).softmax(-1)
        del s
        return (w @ vg).permute(0, 2, 1, 3, 4).flatten(2)  # [b, T, kv g dh]

    def _step(self, x, ctx):
        """Decoding (causal): the new queries against the cached K/V of the last max(O) + 1 positions and their
        own; the cache then keeps the last max(O) + 1."""
        q, k, v = self.qkv(x, ctx.offset)
        old = ctx.cache.caches.get(slot(ctx, self))
        if old is not None:
            k, v = torch.cat((old[0], k), dim=2), torch.cat((old[1], v), dim=2)
        T, N = q.shape[2], k.shape[2]
        end = ctx.offset + T
        o = self.attend(q, k, v, torch.arange(ctx.offset, end, device=x.device),
                        torch.arange(end - N, end, device=x.device), None)
        drop = N - torch.sym_min(N, self.span)  # the positions no later query reaches
        ctx.cache.caches[slot(ctx, self)] = (k[:, :, drop:].clone(), v[:, :, drop:].clone())
        return self.o_proj(o)


def dilated_cost(p: DilatedParams, env: OpEnv, s: Symbols) -> Cost:
    """The projections, then per query its m = |O| gathered keys and values (copies, [b, kv, n, m, dh]), the
    [b, h, n, m] scores and weights, the grouped queries (a copy), o laid out for o_proj (a copy)."""
    h, kv, dh = head_symbols(p, s)
    b, n, by = s.b, s.n, s.bytes
    m = len(signed_offsets(p, env.causal))
    q, kvb, out = b * n * h * dh * by, b * n * kv * dh * by, b * n * s.d * by
    qkv = q + 2 * kvb
    gathered = m * kvb  # each of K and V
    scores = b * h * n * m
    W = scores * by
    # the grouped queries [b, kv, n, g, dh] as the matmul's operand: a copy unless one K/V head (then a view of
    # q's [b, n, h, dh] layout); kept for backward either way (the copy, or q through the view)
    qcopy = q if (p.kv_heads or p.heads) != 1 else 0
    index = 8 * n * m + n * m  # the int64 indices (the gathers' backward), the bool mask [n, m]
    core = Cost(fwd=4 * scores * dh, bwd=8 * scores * dh, fwd_other=6 * scores, bwd_other=10 * scores)
    saved = 2 * gathered + q + W + index + q  # kg, vg; q grouped; the weights; o_proj's input
    live = qkv + 2 * index  # the indices and masks, alive to the end (inference)
    phases = [live + 2 * gathered + qcopy + W,  # the scores
              live + gathered + 2 * W,  # the softmax
              live + gathered + W + q + qcopy,  # w @ vg, o laid out for o_proj (a view too with one K/V head)
              qkv + q + out]  # at o_proj
    bwd = [gathered + W]  # beyond the saved tensors as they are released: the scores' gradient, a gathered one's
    span = max(offsets(p)) + 1 if env.causal else 0  # decoding's cache: the last max(O) + 1 positions
    return attention_cost(p, s, h, kv, dh, core, Cost(), saved, phases, cache=2 * b * sp.Min(n, span) * kv * dh * by,
                          bwd_phases=bwd)


OP = register(Op(
    decode="the keys and values of the last max(O) + 1 positions (kv_heads heads)",
    family="mha", variant="dilated", params=DilatedParams, module=DilatedAttention,
    causal="yes", shape=dilated_shape, supports=frozenset(),
    paper="Transformer on a Diet, Wang et al. 2020, arXiv:2002.06170",
    summary="layer l's query t reads t - o, o in O_l: dilated {j d^l : j < k}, dilated_mem the union over "
            "layers <= l, cascade a window of w m^l; bidirectional: t +- o; O(n |O_l| d)",
    note="", cost=dilated_cost,
))
