"""mha(etc, radius=r, globals=G, segment=S): ETC's global-local attention (Ainslie et al. 2020, "ETC: Encoding Long
and Structured Inputs in Transformers", section 2.1), as its fused form in the authors' etcmodel
(FusedGlobalLocalAttention): l2l and l2g under one softmax, g2g and g2l under another.

The op's input is [global; long]: its first G positions are the global tokens (a spec puts them there with
latent(array) and cat(prefix=...), and drops them after with slice(drop_first=G)), the other n_l = N - G the
long input. Per head, with s_ij = q_i . k_j / sqrt(dh) (one q, k, v projection for all four pieces, etcmodel's
share_qkv_projections default):

    long token i (l2l + l2g):   o_i = sum_{j in G u {long j : |i - j| <= r}} softmax_j(s_ij) v_j
    global token i (g2g + g2l): o_i = sum_{j in G u L(i)} softmax_j(s_ij) v_j,
                                L(i) = every long token, or with segment=S ("hard g2l") the long tokens
                                i S .. i S + S - 1 of global i's own segment

    y_long = o_long W_O (o_proj),   y_global = o_global W_O^g (global_out: etcmodel's separate global output
                                                              projection, share_att_output_projection=False)

With rel=k, ETC's relative position labels (section 2.2, Shaw et al. style; etcmodel's QkvRelativeAttention):
s_ij = (q_i . k_j + q_i . a_{l(i,j)} + c_{l(i,j)}) / sqrt(dh), a learned vector a_l and bias c_l per label
and head, one table for the long queries (l2l, l2g) and one for the global queries (g2g, g2l), 2k + 3 labels
each, as etcmodel's make_global_local_transformer_side_inputs assigns them:
    l2l, g2g: the clipped offset j - i: 0 -> 0, +m -> min(m, k), -m -> k + min(m, k) (2k + 1 labels);
    l2g, g2l: 2k + 2 if the long token is in the global's segment (segment=S), else 2k + 1.
hard= (with segment=S): g2l (the default), l2g (a long token reads only its own global), both, or none (the
segments only label l2g / g2l).

Choices where the paper is silent, or where we differ from etcmodel:
- The global tokens are the first G positions of every sequence (a fixed G given by the spec); etcmodel takes
  the global input as a second tensor of any length. Segments are fixed blocks of S long tokens (the paper's
  "fixed blocks" of long_to_global_ratio tokens); long tokens past G S belong to no global's segment (under
  hard g2l the globals read them only through other layers' local attention; under hard l2g they read no
  global).
- The label tables have the 2k + 3 rows the labels use (etcmodel allocates relative_vocab_size rows, 32 for
  ETC-base, of which 27 are used); a is drawn N(0, 0.02^2) and c starts at 0 (etcmodel: zeros).
- No dropout on the attention weights (dropout= refused): put dropout(standard) on the stream.
- No causal form: a global token reads every long token (causal "no"; the validator refuses causal models).

Differences from mha(longformer, window=2r, globals=G): the same key sets for long queries (a global position
inside a window counts once, as a global key), but shared q/k/v projections (Longformer has separate global
ones), ETC's separate global output projection, and hard g2l. From mha(bigbird): no random keys, a token-level
window rather than blocks, and global tokens that are extra inputs rather than the sequence's first and last
blocks.

Computed in O(N (2 r + 1 + G) + G N) scores: the long rows by _dilated_band.dilated_band (d = 1, blocks of B
queries against G + B + 2r keys in one SDPA call; it also computes the G global rows, which are overwritten),
the global rows as one [G x N] SDPA call (hard g2l: a [G, N] bool mask). With N <= G every position is global:
one SDPA call. Padding: padded keys get no weight; the globals are the first positions and the segments are
counted from the long input's start, so left padding is refused (E409). The export (a symbolic N) pads the
input to at least G + 1 positions (the extra keys masked, the extra rows cut by a gather) so that the long input
is never empty and no shape is negative.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from typing import Literal

from pydantic import Field
from torch import nn

from ..registry import Op, OpEnv, ShapeProblem, register, require_right_padding
from ._common import AttentionBase, AttentionParams
from ._dilated_band import Side, dilated_band
from ._etc_cost import etc_cost
from .isab import no_dropout_shape


class EtcParams(AttentionParams):
    radius: int = Field(84, ge=1, le=1 << 20, description="r: a long token reads the long tokens within r of it "
                                                          "(ETC-base: 84)")
    globals: int = Field(1, ge=1, le=1 << 16, description="G: the first G positions are the global tokens")
    segment: int | None = Field(None, ge=1, le=1 << 20, description="S: long tokens i S .. i S + S - 1 are global "
                                                                     "i's segment (hard g2l by default)")
    hard: Literal["g2l", "l2g", "both", "none"] | None = Field(
        None, description="with segment: g2l (default: a global reads its segment), l2g (a long token reads its "
                          "own global), both, none")
    rel: int = Field(0, ge=0, le=1 << 16, description="k: ETC's relative position labels clipped at k (ETC-base: "
                                                      "12); 0: none")


def _etc_shape(p: EtcParams, env: OpEnv):
    if p.hard is not None and p.segment is None:
        raise ShapeProblem("mha(etc, hard=...) needs segment=S: the segments say which global is a token's own",
                           "hard", "add segment=S (long tokens per global), or remove hard=")
    return no_dropout_shape("mha(etc)")(p, env)


def rel_ids(delta: torch.Tensor, k: int) -> torch.Tensor:
    """ETC's label of the offset delta = j - i, clipped at k: 0, 1..k (after), k+1..2k (before)."""
    a = delta.abs().clamp(max=k)
    return torch.where(delta >= 0, a, k + a)


class EtcAttention(AttentionBase):
    def __init__(self, p: EtcParams, env: OpEnv):
        super().__init__(p, env)
        self.radius, self.globals, self.segment, self.rel = p.radius, p.globals, p.segment, p.rel
        hard = p.hard or ("g2l" if p.segment is not None else "none")
        self.hard_g2l, self.hard_l2g = hard in ("g2l", "both"), hard in ("l2g", "both")
        self.global_out = nn.Linear(self.heads * self.head_dim, env.d, bias=p.bias)
        if p.rel:  # the long and the global queries' label tables: a [2k + 3, h, dh], c [2k + 3, h]
            V = 2 * p.rel + 3
            self.rel_long = nn.Parameter(torch.empty(V, self.heads, self.head_dim).normal_(0.0, 0.02))
            self.rel_global = nn.Parameter(torch.empty(V, self.heads, self.head_dim).normal_(0.0, 0.02))
            self.rel_long_bias = nn.Parameter(torch.zeros(V, self.heads))
            self.rel_global_bias = nn.Parameter(torch.zeros(V, self.heads))

    def forward(self, x, ctx):
        b, N, _ = x.shape
        G = self.globals
        key_mask = self.key_mask(ctx)
        require_right_padding(key_mask, "mha(etc)", "its global tokens are the first positions and its segments are "
                                                    "counted from the long input's start, and left padding moves them")
        if not isinstance(N, int):
            return self._exported(x, key_mask)
        q, k, v = self.qkv(x)
        if N <= G:  # every position global: softmax attention (no long token, no segment)
            if self.rel:
                return self.global_out(self.rows(self._global_rows(q, self.expand_kv(k), self.expand_kv(v),
                                                                   key_mask, N)))
            mask = None if key_mask is None else key_mask[:, None, None, :]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.kv_heads != self.heads)
            return self.global_out(self.rows(o))
        k, v = self.expand_kv(k), self.expand_kv(v)
        y = self.o_proj(dilated_band(q, k, v, self.radius, self.radius, 1, G, 0.0, key_mask, self._side(q, N)))
        y[:, :G] = self.global_out(self.rows(self._global_rows(q[:, :, :G], k, v, key_mask, N)))
        return y

    def _segment_of(self, t: torch.Tensor) -> torch.Tensor:
        """The global whose segment holds position t (a long position), -1 where none (or no segments)."""
        if self.segment is None:
            return torch.full_like(t, -1)
        s = torch.div(t - self.globals, self.segment, rounding_mode="floor")
        return torch.where((t >= self.globals) & (s < self.globals), s, -1)

    def _side(self, q: torch.Tensor, N) -> Side | None:
        """The long rows' labels (window offsets -r .. r, the globals of each position) and hard l2g's keys."""
        if not (self.rel or self.hard_l2g):
            return None
        t = torch.arange(N, device=q.device)[:, None]
        own = self._segment_of(t) == torch.arange(self.globals, device=q.device)[None, :]  # [N, G]
        side = Side(global_keep=own | (t < self.globals) if self.hard_l2g else None)
        if self.rel:
            k = self.rel
            side.scores = self._rel_scores(q, self.rel_long, self.rel_long_bias)
            side.window_ids = rel_ids(torch.arange(-self.radius, self.radius + 1, device=q.device), k)
            side.global_ids = 2 * k + 1 + own.long()
        return side

    def _rel_scores(self, q, table, bias) -> torch.Tensor:
        """(q . a_l + c_l) / sqrt(dh) for every label l: [b, h, n, 2k + 3]."""
        scale = self.head_dim ** -0.5
        return torch.einsum("bhnd,lhd->bhnl", q, table * scale).add_(bias.t()[None, :, None, :] * scale)

    @staticmethod
    def rows(o: torch.Tensor) -> torch.Tensor:
        b, h, n, dh = o.shape
        return o.transpose(1, 2).reshape(b, n, h * dh)

    def _g2l_keep(self, N, device, rows: int) -> torch.Tensor | None:
        """bool [rows, N], the keys the first `rows` global queries read under hard g2l (the globals and its
        segment), or None."""
        if not self.hard_g2l:
            return None
        i = torch.arange(rows, device=device)[:, None]
        j = torch.arange(N, device=device)[None, :]
        return (j < self.globals) | (self._segment_of(j) == i)

    def _global_rows(self, qg, k, v, key_mask, N):
        """The global queries qg [b, h, Gq, dh] (Gq = min(G, N)) against the N keys (k, v with h heads):
        [b, h, Gq, dh]."""
        keep = self._g2l_keep(N, qg.device, qg.shape[2])
        if key_mask is not None:
            km = key_mask[:, None, None, :]
            keep = km if keep is None else keep & km
        if not self.rel:
            return F.scaled_dot_product_attention(qg, k, v, attn_mask=keep)
        i = torch.arange(qg.shape[2], device=qg.device)[:, None]
        j = torch.arange(N, device=qg.device)[None, :]
        ids = torch.where(j < self.globals, rel_ids(j - i, self.rel), 2 * self.rel + 1 + (self._segment_of(j) == i).long())
        bias = self._rel_scores(qg, self.rel_global, self.rel_global_bias)
        bias = bias.gather(-1, ids.expand(*bias.shape[:2], *ids.shape))  # [b, h, Gq, N]
        if keep is not None:
            bias = bias.masked_fill(~keep, float("-inf"))
        return F.scaled_dot_product_attention(qg, k, v, attn_mask=bias)

    def _exported(self, x, key_mask):
        """A symbolic N (export): the input padded to P = max(N, G + 1) positions, so that the long input is never
        empty (no negative or zero length for torch.export to guard); the padded keys masked (a key mask is
        always passed), the first N rows gathered back."""
        b, N, _ = x.shape
        G = self.globals
        P = torch.sym_max(N, G + 1)
        x = F.pad(x, (0, 0, 0, P - N))
        keep = torch.arange(P, device=x.device)[None] < N
        keep = keep.expand(b, P) if key_mask is None else keep & F.pad(key_mask, (0, P - N), value=False)
        q, k, v = self.qkv(x)
        k, v = self.expand_kv(k), self.expand_kv(v)
        y = self.o_proj(dilated_band(q, k, v, self.radius, self.radius, 1, G, 0.0, keep, self._side(q, P)))
        yg = self.global_out(self.rows(self._global_rows(q[:, :, :G], k, v, keep, P)))
        rows = torch.arange(P, device=x.device)
        y = torch.where((rows < G)[None, :, None], F.pad(yg, (0, 0, 0, P - G)), y)
        return y.index_select(1, torch.arange(N, device=x.device))


OP = register(Op(
    decode=None,  # bidirectional only: a global token reads every long token
    family="mha", variant="etc", params=EtcParams, module=EtcAttention,
    causal="no", shape=_etc_shape, cost=etc_cost,
    paper="ETC: Encoding Long and Structured Inputs in Transformers, Ainslie et al. 2020, arXiv:2004.08483",
    summary="the first G positions are global tokens: they read every position (g2g, g2l; segment=S: the globals "
            "and their own S long tokens); a long token reads the long tokens within r and the globals (l2l, "
            "l2g; hard=l2g: its own global), one softmax each; rel=k: learned relative position labels; "
            "O((N (2r + 1 + G) + G N) d)",
    note="",
))
