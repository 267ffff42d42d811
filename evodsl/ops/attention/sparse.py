"""mha(sparse, pattern=strided|fixed, stride=l, c=1): the Sparse Transformer's factorized patterns (Child et al.
2019), in the paper's "merged" form: every head attends the union A(1) u A(2) of the two patterns in one softmax,

    o_t = sum_{r in A(t)} softmax_{r in A(t)}(q_t . k_r / sqrt(dh)) v_r,    A(t) = A1(t) u A2(t)

    strided: A1 = {r : |t - r| <= l} (the band, causal: t - l .. t),  A2 = {r : (t - r) mod l = 0}
    fixed:   A1 = {r : floor(r / l) = floor(t / l)} (the block),     A2 = {r : r mod l in {l-c, .., l-1}}

causal: and r <= t (the paper's autoregressive form); bidirectional: the symmetric sets. (The paper's other two
ways, one pattern per layer or interleaved heads, are not offered.)

No n x n tensor: the sequence is cut into nb = n / l blocks of l (the last zero-padded). The union is split into
disjoint parts whose scores are computed blockwise and joined into one [b, h, nb, l, W] tensor for the softmax:
strided, the band (|t - r| < l) against the previous, own (and, bidirectional, next) block, and the rest of the
residue class of t mod l (the sequence laid out [l, nb]: per class a square of nb x nb scores); fixed, the own
block and the c summary keys of the other blocks (c * nb of them). Each query reads W = 2l + nb (3l + nb) or
l + c nb scores: O(n (l + c n / l) dh), O(n sqrt n dh) at l ~ sqrt n. l >= n is one SDPA call (every key, causal:
every earlier one). An export (symbolic n) gathers each query's keys instead (_gathered). Decoding keeps every key
(its cache grows as softmax's: the strided class reaches back to position t mod l).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ...decode import slot
from ..registry import Op, OpEnv, ShapeProblem, register
from ._banded import _one_call
from ._common import AttentionBase, AttentionParams, attention_shape
from ._sparse_cost import sparse_cost


class SparseParams(AttentionParams):
    pattern: Literal["strided", "fixed"] = Field("strided", description="strided: band + every l-th key back; "
                                                 "fixed: own block + the summary keys of the others")
    stride: int = Field(64, ge=1, le=1 << 16, description="l: the band and stride (strided), the block (fixed)")
    c: int = Field(1, ge=1, le=1 << 16, description="fixed: summary keys per block, positions l-c .. l-1 of each")


def sparse_shape(p: SparseParams, env: OpEnv):
    if p.pattern == "fixed" and p.c >= p.stride:
        raise ShapeProblem(f"c={p.c} is not less than stride={p.stride}", "c", "c summary keys are taken from "
                           "each block of l = stride: c < stride (c = stride would read every key)")
    if p.pattern == "strided" and p.c != 1:
        raise ShapeProblem("c is the fixed pattern's (summary keys per block)", "c",
                           "remove c=, or use pattern=fixed")
    return attention_shape(p, env)


def allows(pattern: str, l, c: int, causal: bool, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Whether query position t reads key position r (int64, broadcasting): the union A1 u A2."""
    if pattern == "strided":
        d = t - r
        ok = d.abs() <= l
        ok |= d % l == 0
    else:
        ok = (torch.div(t, l, rounding_mode="floor") == torch.div(r, l, rounding_mode="floor")) | (r % l >= l - c)
    return ok & (r <= t) if causal else ok


def _band(g: torch.Tensor, P: int) -> torch.Tensor:
    """Blocks [b, h, nb, l, dh] -> the keys of each block's band [b, h, nb, P l, dh]: blocks R-1, R (and R+1),
    zeros outside the sequence. One padded copy, cut into overlapping windows (unfold, whose backward makes
    one tensor), then one copy of the windows."""
    b, h, nb, l, dh = g.shape
    gp = F.pad(g, (0, 0, 0, 0, 1, P - 2)).view(b, h, (nb + P - 1) * l, dh)
    return gp.unfold(2, P * l, l).transpose(-1, -2).contiguous()


def _grid(t: torch.Tensor, nb, l) -> torch.Tensor:
    """[b, h, n, dh] -> contiguous [b, h, nb, l, dh], zero-padded to nb * l positions: one copy."""
    b, h, n, dh = t.shape
    if isinstance(n, int) and n == nb * l:  # F.pad by nothing would keep q's [b, n, h, dh] layout
        return t.contiguous().view(b, h, nb, l, dh)
    return F.pad(t, (0, 0, 0, nb * l - n)).contiguous().view(b, h, nb, l, dh)


def sparse_attention(q, k, v, pattern: str, l: int, c: int, causal: bool, key_mask=None, dropout: float = 0.0):
    """q, k, v [b, h, n, dh] -> [b, h, n, dh] (see the module's docstring). key_mask: bool [b, n], False = a
    padded key; a query left with no key reads its own."""
    b, h, n, dh = q.shape
    dev = q.device
    if not isinstance(n, int) or torch.jit.is_tracing():
        return _gathered(q, k, v, pattern, l, c, causal, key_mask)
    if l >= n:  # one block: every key (causal: every earlier one), one SDPA call
        return _one_call(q, k, v, n, None, dropout, key_mask, causal)
    nb = (n + l - 1) // l
    N = nb * l
    qg, kg, vg = (_grid(t, nb, l) for t in (q, k, v))
    t = torch.arange(N, device=dev).view(nb, l, 1)
    start = (torch.arange(nb, device=dev) * l).view(nb, 1, 1)
    cols = torch.arange(l, device=dev)
    if pattern == "strided":
        P = 2 if causal else 3  # the band's blocks: the previous, the own (and the next)
        keys = [start - l + torch.arange(P * l, device=dev), None]
        scores = [qg @ _band(kg, P).transpose(-1, -2)]  # the band's keys [b, h, nb, P l, dh]
        # the residue classes: position R l + rho at [rho, R]; a class's scores are nb x nb
        qc, kc = (g.transpose(2, 3).contiguous() for g in (qg, kg))
        scores.append((qc @ kc.transpose(-1, -2)).transpose(2, 3))  # [b, h, nb, l, nb] in query order
        del qc, kc
        keys[1] = torch.arange(nb, device=dev).view(1, 1, nb) * l + cols.view(1, l, 1)
        part_ok = [lambda t, r: (t - r).abs() < l, lambda t, r: t != r]
    else:
        ks, vs = (g[:, :, :, l - c:].reshape(b, h, nb * c, dh) for g in (kg, vg))  # the summary keys
        scores = [qg @ kg.transpose(-1, -2), (qg.view(b, h, N, dh) @ ks.transpose(-1, -2)).view(b, h, nb, l, nb * c)]
        del ks
        keys = [start + cols, ((torch.arange(nb, device=dev) * l).view(nb, 1) + (l - c)
                               + torch.arange(c, device=dev)).view(1, 1, nb * c)]
        part_ok = [lambda t, r: True, lambda t, r: torch.div(t, l, rounding_mode="floor") != torch.div(r, l,
                                                                                                     rounding_mode="floor")]
    del qg, kg
    ok = torch.cat([allows(pattern, l, c, causal, t, r) & ((r >= 0) & (r < n)) & f(t, r) for r, f in zip(keys, part_ok)],
                   -1)  # [nb, l, W]
    own = l if pattern == "strided" else 0  # the own key's column: block 0 of the parts is the previous one (strided)
    if key_mask is not None:
        kept = F.pad(key_mask, (0, N - n))
        ok = ok & torch.cat([kept[:, r.clamp(0, N - 1)].expand(b, nb, l, r.shape[-1]) for r in keys], -1)[:, None]
        mine = (torch.arange(ok.shape[-1], device=dev) == (cols + own).view(l, 1))  # [l, W]
        ok = ok | (mine & ~ok.any(-1, keepdim=True))
    scores_far = scores[1].shape[-1]
    s = torch.cat(scores, -1).mul_(dh ** -0.5).masked_fill_(~ok, float("-inf"))
    del scores, ok
    w = F.dropout(s.softmax(-1), dropout)
    del s
    near, far = w.split([w.shape[-1] - scores_far, scores_far], -1)  # the band or block; the class or summaries
    if pattern == "strided":
        o = near @ _band(vg, P) + (far.transpose(2, 3) @ vg.transpose(2, 3).contiguous()).transpose(2, 3)
    else:
        o = near @ vg + (far.reshape(b, h, N, nb * c) @ vs).view(b, h, nb, l, dh)
    return o.reshape(b, h, N, dh)[:, :, :n]


def _gathered(q, k, v, pattern: str, l: int, c: int, causal: bool, key_mask=None):
    """The same attention for a symbolic n (torch.export, ONNX): each query gathers its own keys, [b, h, n, W,
    dh], W = 2l - 1 (causal l) + n/l (strided) or l + c n/l (fixed): O(n (l + n/l) dh) bytes, never n x n, with
    shapes that only scale n (the blocked layout's padding and reshapes would tie the graph to some lengths)."""
    n, dh = q.shape[2], q.shape[3]
    dev = q.device
    t = torch.arange(n, device=dev).unsqueeze(1)  # [n, 1]
    # [1, nb + 1]: one block more than the sequence has (its keys lie past n, masked), so that the axis is never
    # 1 long, which would make torch.export specialise the graph to n > l
    blocks = torch.arange((n + l - 1) // l + 1, device=dev).unsqueeze(0) * l
    if pattern == "strided":
        near = t + torch.arange(-(l - 1), 1 if causal else l, device=dev)  # |t - r| < l
        far = t % l + blocks  # the residue class of t
        ok = [(t - near).abs() < l, far != t]
    else:
        near = torch.div(t, l, rounding_mode="floor") * l + torch.arange(l, device=dev)  # the own block
        far = (blocks.unsqueeze(-1) + (l - c) + torch.arange(c, device=dev)).flatten(1)  # the summary keys
        ok = [near >= 0, torch.div(far, l, rounding_mode="floor") != torch.div(t, l, rounding_mode="floor")]
    r = torch.cat([near, far.expand(n, -1)], -1)  # [n, W]
    ok = torch.cat(ok, -1).expand(n, -1) & allows(pattern, l, c, causal, t, r) & (r >= 0) & (r < n)
    rc = r.clamp(0, n - 1)
    if key_mask is not None:  # [b, 1, n, W]; a query with no key left reads its own (among the near keys)
        ok = ok & key_mask[:, rc].unsqueeze(1)
        mine = (r == t) & (torch.arange(r.shape[-1], device=dev) < near.shape[-1])
        ok = ok | (mine & ~ok.any(-1, keepdim=True))
    kg, vg = k[:, :, rc], v[:, :, rc]  # [b, h, n, W, dh]
    s = (q.unsqueeze(-2) @ kg.transpose(-1, -2)).squeeze(-2) * dh ** -0.5
    w = s.masked_fill(~ok, float("-inf")).softmax(-1)
    return (w.unsqueeze(-2) @ vg).squeeze(-2)


class SparseAttention(AttentionBase):
    def __init__(self, p: SparseParams, env: OpEnv):
        super().__init__(p, env)
        self.pattern, self.stride, self.c = p.pattern, p.stride, p.c

    def forward(self, x, ctx):
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        q, k, v = self.qkv(x)
        o = sparse_attention(q, self.expand_kv(k), self.expand_kv(v), self.pattern, self.stride, self.c,
                             self.causal, self.key_mask(ctx), self.dropout if self.training else 0.0)
        return self.out(o)

    def _step(self, x, ctx):
        """Decoding (causal): the new queries against every cached key and their own, masked to the pattern;
        the cache keeps all keys and values (rotated, K/V heads)."""
        start = ctx.offset
        q, k, v = self.qkv(x, start)
        old = ctx.cache.caches.get(slot(ctx, self))
        if old is not None:
            k, v = torch.cat((old[0], k), dim=2), torch.cat((old[1], v), dim=2)
        ctx.cache.caches[slot(ctx, self)] = (k, v)
        n, keys = q.shape[2], k.shape[2]
        i = torch.arange(start, start + n, device=x.device)[:, None]
        j = torch.arange(keys, device=x.device)[None, :]
        mask = allows(self.pattern, self.stride, self.c, True, i, j)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.kv_heads != self.heads)
        return self.out(o)


OP = register(Op(
    decode="a cache of every key and value (kv_heads heads): the strided class reaches back to the start",
    family="mha", variant="sparse", params=SparseParams, module=SparseAttention,
    causal="yes", shape=sparse_shape, supports=frozenset({"rope", "xpos"}),
    paper="Generating Long Sequences with Sparse Transformers, Child et al. 2019, arXiv:1904.10509",
    summary="softmax attention over the union of two factorized patterns (merged heads): strided, the last l "
            "keys and every l-th; fixed, the own block of l and the last c keys of every block; O(n (l + n/l) d)",
    note="", cost=sparse_cost,
))
