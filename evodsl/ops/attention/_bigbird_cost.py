"""The cost of mha(bigbird) in the form that runs (bigbird.py)."""
from __future__ import annotations

from ..cost import Cost, Symbols
from ..registry import OpEnv
from ._common import AttentionParams, attention_cost, head_symbols


def bigbird_cost(p: AttentionParams, env: OpEnv, s: Symbols) -> Cost:
    h, kv, dh = head_symbols(p, s)
    return attention_cost(p, s, h, kv, dh, Cost(), Cost(), 0, [0], 0)
