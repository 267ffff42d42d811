"""Attention sinks, two forms.

- sinks=S (StreamingLLM, Xiao et al. 2023, arXiv:2309.17453, section 3.2) on mha(local, window=w): every query
  also reads the first S tokens of its sequence (causal: those not after it), in the same softmax as its window:

      causal: keys {r : t-w < r <= t} U {r < S : r <= t};   bidirectional: {r : |t-r| < w} U {r < S}.

  The paper keeps the sinks' K/V and a rolling cache of the last w; decoding here keeps the same, min(t, S) +
  min(t, w) keys after t tokens. Positions are the tokens' own (with rope, the sinks keep their rotation; the
  paper re-indexes positions within the cache, which equals this for the window but not for the sinks: we do
  not re-index, so that decoding equals the forward). Only local takes it: softmax reads the first tokens
  already. Left padding moves the first tokens and is refused (E409).
- sink_logit=true (gpt-oss, OpenAI 2025; "off-by-one" softmax): a learned logit a_h per head joins every
  softmax's denominator, o_t = sum_r exp(s_tr) v_r / (exp(a_h) + sum_r exp(s_tr)), so a head can put weight
  nowhere. On mha(softmax) and mha(local); parameter `sink_logit` [heads], initialised to 0.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ..registry import OpParams


class SinkLogitParams(OpParams):
    sink_logit: bool = Field(False, description="a learned logit per head in every softmax's denominator "
                                                "(gpt-oss's sinks)")


class SinksParams(SinkLogitParams):
    sinks: int = Field(0, ge=0, le=1 << 16, description="S: every query also reads the first S tokens "
                                                        "(StreamingLLM's attention sinks)")


def sink_logit(p, heads: int) -> nn.Parameter | None:
    return nn.Parameter(torch.zeros(heads)) if getattr(p, "sink_logit", False) else None
