"""pos(none), NoPE (2203.16634): the explicit "no positions": the identity, the same model as no pos op at all
(the same parameters and outputs), refused in a bidirectional model (E300, with its reason)."""
from __future__ import annotations

import pytest
import torch

import evodsl
from evodsl.ops import load_all, lookup

SRC = ("d_model = 32\nheads = 4\nmodel m(causal={causal}) = input(tokens, vocab=50) -> embed(token) {pos}"
       "-> repeat(norm -> mha(kv_heads=2) -> norm -> ffn, 2) -> head(lm)")


def test_pos_none_is_the_model_without_positions():
    with_none = evodsl.compile(SRC.format(causal="true", pos="-> pos(none) "), dtype=torch.float64)
    without = evodsl.compile(SRC.format(causal="true", pos=""), dtype=torch.float64)
    assert list(with_none.state_dict()) == list(without.state_dict())
    without.load_state_dict(with_none.state_dict())
    ids = torch.randint(0, 50, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(with_none(ids), without(ids))
    costs = [evodsl.cost(SRC.format(causal="true", pos=p), seq=64, batch=2) for p in ("-> pos(none) ", "")]
    assert costs[0]["params"] == costs[1]["params"]


def test_a_bidirectional_model_is_refused():
    with pytest.raises(evodsl.EvoError) as e:
        evodsl.compile(SRC.format(causal="false", pos="-> pos(none) "))
    text = str(e.value)
    assert "pos(none) in a bidirectional model" in text and "cannot tell their order" in text
    assert "help: make the model causal" in text


def test_declaration():
    load_all()
    op = lookup("pos", "none")
    assert op.causal == "yes" and "2203.16634" in op.paper and op.attach is None
