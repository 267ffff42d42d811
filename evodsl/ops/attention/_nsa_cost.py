"""The cost of mha(nsa) (nsa.py)."""
from __future__ import annotations

from ..cost import Cost, Symbols
from ..registry import OpEnv


def nsa_cost(p, env: OpEnv, s: Symbols) -> Cost:
    return Cost()
