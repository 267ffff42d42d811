"""Talking-heads attention (Shazeer, Lan, Cheng, Ding, Hou 2020, arXiv:2003.02436, section 4), a modifier of
mha(softmax) and mha(local): the logits are mixed across heads by a learned h x h matrix P_l before the softmax,
and the weights by P_w after it,

    J_h   = q_{t,h} . k_{r,h} * scale                         (each head's logits, [h] per position pair t, r)
    L_g   = sum_h J_h P_l[h, g]                              (talking before the softmax)
    W_g   = softmax_r(L_g)    over query t's keys r          (per mixed head, masked after the mixing)
    U_e   = sum_g W_g P_w[g, e]                              (talking after it)
    o_t,e = sum_r U_e(t, r) v_{r,e}

Choices where the paper is silent or general:
- h x h only: the paper lets the logits' heads h_k, the softmax's h and the values' h_v differ (P_l h_k x h, P_w
  h x h_v); here h_k = h = h_v = heads (its experiments' main rows), so the projections stay mha's.
- P_l and P_w start at the identity (the plain op); the paper initialises them randomly.
- The mixing is per position pair (t, r), across heads only: causal-safe, and the mask is applied to the mixed
  logits (masking before the mixing would mix -inf). With softcap= the cap bends each head's own scores before the
  mixing; the sink logit joins the mixed heads' softmax (one more column, zero value, cut before P_w).
- No SDPA (it cannot mix heads): the explicit-score kernel of _scored.py in row blocks, every head of a block at
  once (the mixing needs them all), no n x n tensor beyond a block. GQA: K/V heads are expanded to h first.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ..registry import OpParams


class TalkingParams(OpParams):
    talking: bool = Field(False, description="talking heads: logits mixed across heads by a learned h x h matrix "
                                             "before the softmax, the weights by another after it")


class TalkingHeads(nn.Module):
    """P_l (`logits`) and P_w (`weights`), [h, h], identity at the start."""

    def __init__(self, heads: int):
        super().__init__()
        self.logits = nn.Parameter(torch.eye(heads))
        self.weights = nn.Parameter(torch.eye(heads))


def talking_heads(p, heads: int) -> TalkingHeads | None:
    return TalkingHeads(heads) if getattr(p, "talking", False) else None


def mix(t: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """t [b, h, ...] -> [b, h, ...] with out[:, g] = sum_h t[:, h] P[h, g]: one batched matmul over the heads,
    P^T expanded to [b, h, h] @ t [b, h, M] (a 2-D left operand would make matmul fold a transposed copy of t)."""
    b, h = t.shape[0], t.shape[1]
    return torch.bmm(P.t().to(t.dtype).expand(b, h, h), t.flatten(2)).view(t.shape)
