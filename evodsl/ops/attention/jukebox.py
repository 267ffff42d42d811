"""mha(jukebox, pattern=row|column|prev_row, block=l): Jukebox's factorized attention (Dhariwal et al. 2020,
appendix B.2), one pattern per layer: the sequence is folded into rows of l positions (position t at row t // l,
column t mod l), and, with s_tr = q_t . k_r / sqrt(dh), per head

    o_t = sum_{r in A(t)} softmax_{r in A(t)}(s_tr) v_r,
    row:      A(t) = {r : r // l = t // l}          (its own row; causal: r <= t)
    column:   A(t) = {r : r = t mod l (mod l)}      (its own column; causal: r <= t)
    prev_row: A(t) = {r : r // l = t // l - 1}      (the whole previous row: causal as it stands)

The paper stacks the three in turn (block, transpose block, previous-block attention); a spec writes them as three
layers. Row 0's prev_row set is empty: its output is 0 (Jukebox's previous block of zero keys and values gives the
same). Bidirectional, row and column read their whole row and column.

One F.scaled_dot_product_attention call per layer, no mask but at the edges: row over [b nr, h, l, dh], a view
of the projections ([b, n, h, dh] folded; n is zero-padded to nr l = N where l does not divide it); column over the
transposed grid [b l, h, nr, dh] (one copy of q, k and v, and of the output); prev_row over the rows of q against
k and v shifted one row down (a copy each). l is clipped to n. Scores: n l (row, prev_row) or n^2 / l (column),
O(n sqrt n d) over the three at l ~ sqrt n. Rows are counted from each sequence's first position: left padding is
refused (E409). Export (symbolic n) gathers each query's keys (_gathered). Decoding keeps the keys a later query
still reads: the current row (row), the previous and current rows (prev_row), every key (column).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ...decode import slot
from ..registry import Op, OpEnv, register, require_right_padding
from ._common import AttentionBase, AttentionParams, attention_shape
from ._jukebox_cost import jukebox_cost


class JukeboxParams(AttentionParams):
    pattern: Literal["row", "column", "prev_row"] = Field("row", description="row: own row; column: own column; "
                                                         "prev_row: the previous row (rows of `block` positions)")
    block: int = Field(64, ge=1, le=1 << 16, description="l: positions per row (Jukebox's block_ctx)")


def allows(pattern: str, l: int, causal: bool, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Whether query position t reads key position r (int64, broadcasting)."""
    row_t, row_r = torch.div(t, l, rounding_mode="floor"), torch.div(r, l, rounding_mode="floor")
    if pattern == "prev_row":
        return row_r == row_t - 1
    ok = row_r == row_t if pattern == "row" else (t - r) % l == 0
    return ok & (r <= t) if causal else ok


def _own(ok: torch.Tensor) -> torch.Tensor:
    """A query left with no key (padding) reads its own: ok [.., L, L] over a row or column."""
    eye = torch.eye(ok.shape[-1], dtype=torch.bool, device=ok.device)
    return ok | (eye & ~ok.any(-1, keepdim=True))


def factorized(q, k, v, pattern: str, l: int, causal: bool, key_mask=None, dropout: float = 0.0):
    """q [b, h, n, dh], k, v [b, kv, n, dh] (views of the projections' [b, n, heads, dh] outputs) -> the output
    laid out for o_proj, [b, n, h dh]. key_mask: bool [b, n], right padding (False = a padded key)."""
    b, h, n, dh = q.shape
    kvh = k.shape[1]
    l = min(l, n)
    nr = -(-n // l)
    N, pad = nr * l, nr * l - n
    valid = None
    if pattern != "prev_row" and (key_mask is not None or (pad and not causal)):
        valid = F.pad(key_mask if key_mask is not None else q.new_ones(b, n, dtype=torch.bool), (0, pad), value=False)
    gqa = kvh != h
    if pattern == "column":
        def fold(t):  # [b, H, n, dh] -> [b l, H, nr, dh]: one copy, zero-padded
            H = t.shape[1]
            g = t.new_zeros(b, l, H, nr, dh)
            rows = g.permute(0, 3, 1, 2, 4)  # [b, nr, l, H, dh], a view
            full = (n // l) * l
            rows[:, :n // l] = t.transpose(1, 2)[:, :full].view(b, n // l, l, H, dh)
            if full < n:
                rows[:, n // l, :n - full] = t.transpose(1, 2)[:, full:]
            return g.view(b * l, H, nr, dh)

        mask = None
        if valid is not None:
            ok = valid.view(b, nr, l).transpose(1, 2).reshape(b * l, 1, 1, nr)
            ok = ok & torch.ones(nr, nr, dtype=torch.bool, device=q.device).tril() if causal else ok
            mask = ok if key_mask is None else _own(ok)  # only padding empties a column
        o = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), attn_mask=mask, dropout_p=dropout,
                                           is_causal=causal and mask is None and nr > 1, enable_gqa=gqa)
        return o.reshape(b, l, h, nr, dh).permute(0, 3, 1, 2, 4).reshape(b, N, h * dh)[:, :n]

    def rows(t):  # [b, H, n, dh] -> [b nr, H, l, dh]: a view of [b, N, H, dh] (one padded copy where l | n fails)
        t = t.transpose(1, 2)
        t = F.pad(t, (0, 0, 0, 0, 0, pad)) if pad else t
        return t.reshape(b * nr, l, t.shape[2], dh).transpose(1, 2)

    none = None
    if pattern == "row":
        kr, vr, mask = rows(k), rows(v), None
        if valid is not None:
            ok = valid.view(b * nr, 1, 1, l)
            ok = ok & torch.ones(l, l, dtype=torch.bool, device=q.device).tril() if causal else ok
            mask = ok if key_mask is None else _own(ok)  # only padding empties a row
    else:  # prev_row: keys and values one row down, zeros before the first
        def shifted(t):
            t = F.pad(t.transpose(1, 2)[:, :N - l], (0, 0, 0, 0, l, 0))
            return t.view(b * nr, l, t.shape[2], dh).transpose(1, 2)

        kr, vr, mask = shifted(k), shifted(v), None
        if key_mask is not None:
            ok = F.pad(key_mask[:, :N - l], (l, 0), value=False).view(b * nr, 1, 1, l)
            none = ~ok.any(-1, keepdim=True)
            mask = ok | none
    o = F.scaled_dot_product_attention(rows(q), kr, vr, attn_mask=mask, dropout_p=dropout,
                                       is_causal=pattern == "row" and causal and mask is None and l > 1,
                                       enable_gqa=gqa)
    if none is not None:  # a query whose previous row is all padding (or row 0) reads nothing
        o = o.masked_fill(none, 0.0)
    return o.transpose(1, 2).reshape(b, N, h * dh)[:, :n]


def _gathered(q, k, v, pattern: str, l: int, causal: bool, key_mask=None):
    """The same attention for a symbolic n (torch.export, ONNX): each query gathers its own keys, [b, h, n, W,
    dh], W = l (row, prev_row) or n / l + 1 (column): O(n l dh) or O(n^2 / l dh) bytes, shapes that only scale n.
    k, v with h heads. Returns [b, h, n, dh]."""
    n, dh = q.shape[2], q.shape[3]
    t = torch.arange(n, device=q.device).unsqueeze(1)  # [n, 1]
    row = torch.div(t, l, rounding_mode="floor")
    if pattern == "column":  # one slot more than the column has (masked), so that the axis is never 1 long
        r = t % l + torch.arange((n + l - 1) // l + 1, device=q.device) * l
    else:
        r = (row - int(pattern == "prev_row")) * l + torch.arange(l, device=q.device)
    ok = (r >= 0) & (r < n) & allows(pattern, l, causal, t, r)
    rc = r.clamp(0, n - 1)
    if key_mask is not None:
        ok = ok & key_mask[:, rc].unsqueeze(1)  # [b, 1, n, W]
    none = ~ok.any(-1, keepdim=True)
    # a query with no key left reads its own (prev_row: nothing, its output 0 below)
    ok = ok | (none if pattern == "prev_row" else (r == t) & none)
    s = (q.unsqueeze(-2) @ k[:, :, rc].transpose(-1, -2)).squeeze(-2) * (1.0 / math.sqrt(dh))
    w = s.masked_fill(~ok, float("-inf")).softmax(-1)
    o = (w.unsqueeze(-2) @ v[:, :, rc]).squeeze(-2)
    return o.masked_fill(none, 0.0) if pattern == "prev_row" else o


class JukeboxAttention(AttentionBase):
    def __init__(self, p: JukeboxParams, env: OpEnv):
        super().__init__(p, env)
        self.pattern, self.block = p.pattern, p.block

    def forward(self, x, ctx):
        if ctx is not None and ctx.cache is not None:
            return self._step(x, ctx)
        key_mask = self.key_mask(ctx)
        require_right_padding(key_mask, "mha(jukebox)", "its rows are counted from each sequence's first position, "
                                                        "and left padding moves the tokens")
        q, k, v = self.qkv(x)
        dropout = self.dropout if self.training else 0.0
        if not isinstance(x.shape[1], int) or torch.jit.is_tracing():
            return self.out(_gathered(q, self.expand_kv(k), self.expand_kv(v), self.pattern, self.block,
                                      self.causal, key_mask))
        return self.o_proj(factorized(q, k, v, self.pattern, self.block, self.causal, key_mask, dropout))

    def _step(self, x, ctx):
        """Decoding (causal): the new queries against the cached keys and their own, masked to the pattern; the
        cache then keeps what later queries read: the current row's keys (row), the previous and current rows'
        (prev_row), all (column)."""
        start, l = ctx.offset, self.block
        q, k, v = self.qkv(x, start)
        old = ctx.cache.caches.get(slot(ctx, self))
        if old is not None:
            k, v = torch.cat((old[0], k), dim=2), torch.cat((old[1], v), dim=2)
        total, keys = start + q.shape[2], k.shape[2]
        i = torch.arange(start, total, device=x.device)[:, None]
        ok = allows(self.pattern, l, True, i, torch.arange(total - keys, total, device=x.device)[None, :])
        none = ~ok.any(-1, keepdim=True)  # prev_row's first row
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=ok | none, enable_gqa=self.kv_heads != self.heads)
        keep = {"row": total % l, "prev_row": min(total, l + total % l), "column": total}[self.pattern]
        ctx.cache.caches[slot(ctx, self)] = (k[:, :, keys - keep:].clone(), v[:, :, keys - keep:].clone())
        return self.out(o.masked_fill(none, 0.0))


OP = register(Op(
    decode=lambda p: {"row": "the K/V of the current row: at most l - 1 positions (kv_heads heads)",
                      "prev_row": "the K/V of the previous and current rows: at most 2 l - 1 positions",
                      "column": "a cache of every key and value (kv_heads heads): a column reaches the start"}[p.pattern],
    family="mha", variant="jukebox", params=JukeboxParams, module=JukeboxAttention,
    causal="yes", shape=attention_shape,
    paper="Jukebox: A Generative Model for Music, Dhariwal et al. 2020, arXiv:2005.00341",
    summary="softmax attention over one factorized pattern of rows of l: the own row, the own column (t mod l) "
            "or the previous row; causal: r <= t; O(n l d) or O(n^2 / l d)",
    note="", cost=jukebox_cost,
))
