"""Talking-heads attention (Shazeer, Lan, Cheng, Ding, Hou 2020, arXiv:2003.02436, section 4), a modifier of
mha(softmax) and mha(local): the logits are mixed across heads by a learned h x h matrix P_l before the softmax,
and the weights by P_w after it,

    J_h   = q_{t,h} . k_{r,h} * scale                         (each head's logits, [h] per position pair t, r)
    L_g   = sum_h J_h P_l[h, g]                              (talking before the softmax)
    W_g   = softmax_r(L_g)    over query t's keys r          (per mixed head, masked after the mixing)
    U_e   = sum_g W_g P_w[g, e]                              (talking after it)
    o_t,e = sum_r U_e(t, r) v_{r,e}

The paper's section 4 lets the logit heads h_k, the softmax heads h and the value heads h_v differ (its listing:
J = einsum("nhk,mhk->nhm", Q, K) over h_k heads, L = einsum("nhm,hi->nim", J, P_l) with P_l [h_k, h], W =
softmax(L), U = einsum("nhm,hj->njm", W, P_w) with P_w [h, h_v], O = einsum("njm,mjv->njv", U, V)). Here
h_k = h_v = heads (mha's projections unchanged) and h = H: `talking=true` is H = heads, `talking=H` sets the
softmax heads between the two mixings (P_l heads x H, P_w H x heads).

Choices where the paper is silent or general:
- P_l and P_w start at the (rectangular) identity: the plain op when H = heads; with H < heads the first H heads'
  logits, each feeding its own value head (the others' weights start at zero); with H > heads the extra softmax
  heads start uniform and unread. The paper initialises them randomly.
- The learned sink logit (sink_logit=true) is one per softmax head, H of them.
- The mixing is per position pair (t, r), across heads only: causal-safe, and the mask is applied to the mixed
  logits (masking before the mixing would mix -inf). With softcap= the cap bends each head's own scores before the
  mixing; the sink logit joins the mixed heads' softmax (one more column, zero value, cut before P_w).
- No SDPA (it cannot mix heads): the explicit-score kernel of _scored.py in row blocks, every head of a block at
  once (the mixing needs them all), no n x n tensor beyond a block. GQA: K/V heads are expanded to h first.
"""
from __future__ import annotations

import torch
from typing import Annotated

from pydantic import Field
from torch import nn

from ..registry import OpParams


class TalkingParams(OpParams):
    talking: bool | Annotated[int, Field(ge=1, le=4096)] = Field(
        False, description="talking heads: logits mixed across heads by a learned heads x H matrix before the "
                           "softmax, the weights by an H x heads one after it (true: H = heads; H: the softmax heads)")


def talking_width(p, heads: int) -> int:
    """H, the softmax heads between the mixings (heads without talking=)."""
    talking = getattr(p, "talking", False)
    return heads if talking is True or talking is False else talking


class TalkingHeads(nn.Module):
    """P_l (`logits`, [heads, H]) and P_w (`weights`, [H, heads]), the (rectangular) identity at the start."""

    def __init__(self, heads: int, softmax_heads: int):
        super().__init__()
        self.logits = nn.Parameter(torch.eye(heads, softmax_heads))
        self.weights = nn.Parameter(torch.eye(softmax_heads, heads))


def talking_heads(p, heads: int) -> TalkingHeads | None:
    return TalkingHeads(heads, talking_width(p, heads)) if getattr(p, "talking", False) else None


def mix(t: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """t [b, h, ...] -> [b, g, ...] with out[:, g] = sum_h t[:, h] P[h, g] (P [h, g]): one batched matmul over the
    heads, P^T expanded to [b, g, h] @ t [b, h, M] (a 2-D left operand would make matmul fold a transposed copy
    of t)."""
    b, h, g = t.shape[0], t.shape[1], P.shape[1]
    return torch.bmm(P.t().to(t.dtype).expand(b, g, h), t.flatten(2)).view(b, g, *t.shape[2:])
