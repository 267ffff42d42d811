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

Choices where the paper is silent, or where we differ from etcmodel:
- The global tokens are the first G positions of every sequence (a fixed G given by the spec); etcmodel takes
  the global input as a second tensor of any length. Hard g2l takes fixed segments of S long tokens (the
  paper's "fixed blocks" of long_to_global_ratio tokens); long tokens past G S belong to no global's segment
  (they are read by the globals only through other layers' local attention). Hard l2g is not built.
- ETC's relative position labels (a learned vector per clipped relative distance, Shaw et al. style, added
  to the scores) are not built: positions come from the spec's position scheme.
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
from pydantic import Field
from torch import nn

from ...diagnostics import Diagnostic, EvoError
from ..registry import Op, OpEnv, is_symbolic, register, right_padded
from ._common import AttentionBase, AttentionParams
from ._dilated_band import dilated_band
from ._etc_cost import etc_cost
from .isab import no_dropout_shape


class EtcParams(AttentionParams):
    radius: int = Field(84, ge=1, le=1 << 20, description="r: a long token reads the long tokens within r of it "
                                                          "(ETC-base: 84)")
    globals: int = Field(1, ge=1, le=1 << 16, description="G: the first G positions are the global tokens")
    segment: int | None = Field(None, ge=1, le=1 << 20, description="S: hard g2l, global i reads only long tokens "
                                                                     "i S .. i S + S - 1 (default: every one)")


class EtcAttention(AttentionBase):
    def __init__(self, p: EtcParams, env: OpEnv):
        super().__init__(p, env)
        self.radius, self.globals, self.segment = p.radius, p.globals, p.segment
        self.global_out = nn.Linear(self.heads * self.head_dim, env.d, bias=p.bias)

    def forward(self, x, ctx):
        b, N, _ = x.shape
        G = self.globals
        key_mask = self.key_mask(ctx)
        if key_mask is not None and not is_symbolic(key_mask) and not right_padded(key_mask):
            raise EvoError([Diagnostic("E409", "mha(etc) needs right padding: its global tokens are the first "
                                               "positions and its segments are counted from the long input's "
                                               "start, and left padding moves them",
                                       help="pad after the tokens (tokenizer padding_side='right')")])
        if not isinstance(N, int):
            return self._exported(x, key_mask)
        q, k, v = self.qkv(x)
        if N <= G:  # every position global: softmax attention (no long token, no segment)
            mask = None if key_mask is None else key_mask[:, None, None, :]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.kv_heads != self.heads)
            return self.global_out(self.rows(o))
        k, v = self.expand_kv(k), self.expand_kv(v)
        y = self.o_proj(dilated_band(q, k, v, self.radius, self.radius, 1, G, 0.0, key_mask))
        y[:, :G] = self.global_out(self.rows(self._global_rows(q[:, :, :G], k, v, key_mask, N)))
        return y

    @staticmethod
    def rows(o: torch.Tensor) -> torch.Tensor:
        b, h, n, dh = o.shape
        return o.transpose(1, 2).reshape(b, n, h * dh)

    def _g2l_keep(self, N, device) -> torch.Tensor | None:
        """bool [G, N], the keys a global query reads under hard g2l (the globals and its segment), or None."""
        if self.segment is None:
            return None
        i = torch.arange(self.globals, device=device)[:, None]
        j = torch.arange(N, device=device)[None, :]
        return (j < self.globals) | (torch.div(j - self.globals, self.segment, rounding_mode="floor") == i)

    def _global_rows(self, qg, k, v, key_mask, N):
        """The global queries qg [b, h, Gq, dh] against the N keys (k, v with h heads): [b, h, Gq, dh]."""
        keep = self._g2l_keep(N, qg.device)
        if key_mask is not None:
            km = key_mask[:, None, None, :]
            keep = km if keep is None else keep & km
        return F.scaled_dot_product_attention(qg, k, v, attn_mask=keep)

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
        y = self.o_proj(dilated_band(q, k, v, self.radius, self.radius, 1, G, 0.0, keep))
        yg = self.global_out(self.rows(self._global_rows(q[:, :, :G], k, v, keep, P)))
        rows = torch.arange(P, device=x.device)
        y = torch.where((rows < G)[None, :, None], F.pad(yg, (0, 0, 0, P - G)), y)
        return y.index_select(1, torch.arange(N, device=x.device))


OP = register(Op(
    decode=None,  # bidirectional only: a global token reads every long token
    family="mha", variant="etc", params=EtcParams, module=EtcAttention,
    causal="no", shape=no_dropout_shape("mha(etc)"), cost=etc_cost,
    paper="ETC: Encoding Long and Structured Inputs in Transformers, Ainslie et al. 2020, arXiv:2004.08483",
    summary="the first G positions are global tokens: they read every position (g2g, g2l; segment=S: the globals "
            "and their own S long tokens); a long token reads the long tokens within r and the globals (l2l, "
            "l2g), one softmax each; O((N (2r + 1 + G) + G N) d)",
    note="",
))
