"""residual(skipinit): SkipInit (De & Smith 2020), x_{i+1} = x_i + alpha_i F(x_i), alpha_i a learned scalar
initialised to 0, with no normalization in the block.

The same wiring as residual(rezero) (Bachlechner et al. 2020), down to the parameter: one scalar per residual
branch, zero at the start, so that every block is the identity at initialisation. The papers differ in what they
remove, not in what they compute: SkipInit is De & Smith's replacement for BatchNorm in residual networks (they
show BatchNorm's effect is to down-weight the residual branch by ~1/sqrt(depth) at init), ReZero the replacement
for LayerNorm in Transformers. So skipinit is a documented alias of rezero: the params model, module and cost
are rezero's (one declaration, two names); only the paper reference differs. Where the paper is silent for
Transformers: no norm is added, the branch's own bias is kept (the paper's optional extra scalar bias is not)."""
from __future__ import annotations

from dataclasses import replace

from ..registry import register
from .rezero import OP as REZERO

OP = register(replace(
    REZERO, variant="skipinit",
    paper="Batch Normalization Biases Residual Blocks Towards the Identity Function in Deep Networks, "
          "De & Smith 2020, arXiv:2002.10444",
    summary="x + alpha * F(x), alpha learned, alpha(0) = 0 (rezero's wiring, as BatchNorm's replacement)",
    note="Normalize_And_Residual/002.md",
))
