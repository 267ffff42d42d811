"""norm(fixnorm): FixNorm (Nguyen & Chiang 2018, as used by Nguyen & Salazar 2019, "Transformers without Tears"):
each word embedding is l2-normalised to one learned length g, FixNorm(w) = g * w / ||w||, written right after
the embedding: `embed(token) -> norm(fixnorm) -> ...`.

Normalising the looked-up vector is normalising the table's rows (a lookup commutes with a per-row map), so
FixNorm computes what ScaleNorm computes, g * x / max(||x||, eps) with one scalar g, on the embeddings instead of
inside the blocks: it is a documented alias of norm(scalenorm), whose params model, module and cost it shares
(one declaration, two names). Choices where the papers are silent: g starts at sqrt(d) (ScaleNorm's init: the
length of a unit-variance vector), eps = 1e-5 guards a zero row; where it goes is the spec's (the op does not
check that an embedding precedes it)."""
from __future__ import annotations

from dataclasses import replace

from ..registry import register
from .scalenorm import OP as SCALENORM

OP = register(replace(
    SCALENORM, variant="fixnorm",
    paper="Improving Lexical Choice in Neural Machine Translation, Nguyen & Chiang 2018, arXiv:1710.01329; "
          "Transformers without Tears, Nguyen & Salazar 2019, arXiv:1910.05895",
    summary="g * e / max(||e||_2, eps) on the word embeddings e, g a learned scalar, g(0) = sqrt(d) "
            "(scalenorm's form)",
))
