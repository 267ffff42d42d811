"""Score soft-capping (Gemma 2, Gemma Team 2024, arXiv:2408.00118, section 2): before the softmax every
attention logit is squashed into (-c, c),

    s <- c tanh(s / c)        (Gemma 2: c = 50 on attention; 30 on the final logits, head(lm, softcap=30))

SDPA cannot apply it (its kernels take an additive mask only), so an attention with softcap= runs the row-blocked
explicit-score kernel (_scored.py). The cap applies to the scaled scores q.k * scale; the learned sink logit
(_sinks.py) is not capped (gpt-oss, its source, has no cap; our choice). Positions inside attention: the schemes
that only turn q and k (rope, xpos, randomized_rope), which the projections apply, and ALiBi's bias, added to the
capped scores (capping it would flatten its distance penalty at c); a learned bias (kerple, t5_bias) is refused."""
from __future__ import annotations

from pydantic import Field

from ..registry import OpEnv, OpParams, ShapeProblem


class SoftcapParams(OpParams):
    softcap: float | None = Field(None, gt=0, description="c: scores <- c tanh(scores / c) before the softmax "
                                                          "(Gemma 2: 50)")


def modifiers(p) -> list[str]:
    """The modifiers a call sets (softcap=, sinks=, sink_logit=, talking=), as written."""
    out = []
    if getattr(p, "softcap", None) is not None:
        out.append(f"softcap={p.softcap:g}")
    if getattr(p, "sinks", 0):
        out.append(f"sinks={p.sinks}")
    if getattr(p, "sink_logit", False):
        out.append("sink_logit=true")
    talking = getattr(p, "talking", False)
    if talking:
        out.append("talking=true" if talking is True else f"talking={talking}")
    return out


def rotations() -> list[str]:
    """The position schemes that act inside attention by turning (and scaling) q and k only, no score bias: the
    explicit-score kernel takes them as they are, through the projections (rope, xpos, randomized_rope)."""
    from ..position.rope import Rotary
    from ..registry import lookup, variants

    return [v for v in variants("pos") if isinstance(lookup("pos", v).attach, type)
            and issubclass(lookup("pos", v).attach, Rotary)]


def inside() -> list[str]:
    """The position schemes the explicit-score kernel takes inside attention: those that turn q and k, and ALiBi's
    bias (added to the capped scores block by block; a learned bias, KERPLE's or T5's, is not modelled)."""
    return sorted([*rotations(), "alibi"])


def check_modifiers(op_id: str, p, env: OpEnv) -> None:
    """What the explicit-score kernel does not model: refused with the field to point at."""
    mods = modifiers(p)
    if not mods:
        return
    field = mods[0].split("=")[0]
    what = ", ".join(mods)
    if p.dropout:
        raise ShapeProblem(f"{op_id} with {what} has no dropout on its weights", "dropout",
                           "remove dropout=, or put dropout(standard) on the stream")
    if env.pos is not None and env.pos[0].variant not in inside():
        names = ", ".join(f"pos({v})" for v in inside())
        raise ShapeProblem(f"{op_id} with {what} takes only the position schemes that turn q and k, or ALiBi's "
                           f"bias ({names}) inside attention, not pos({env.pos[0].variant})", field,
                           f"use one of {names}, or a position scheme added to the stream (pos(sinusoidal), "
                           "pos(learned))")
    if env.residual_scores or env.memory is not None:
        raise ShapeProblem(f"{op_id} with {what} runs no RealFormer residual scores and keeps no memory(xl)", field,
                           "drop the modifier, or the residual(..., scores=true) / memory(xl) around it")
