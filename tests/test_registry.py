"""Every registered op is declared whole, once: params model, shape rule, causal claim, paper, module."""
from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel

from evodsl.ops import FAMILIES, REGISTRY, Op, load_all, register
from evodsl.ops.registry import OpParams

load_all()

# The first catalog (issue 2): every row must be registered.
CATALOG = [
    "norm(layernorm)", "norm(rmsnorm)", "norm(scalenorm)", "residual(rezero)",
    "mha(softmax)", "mha(adaptive_span)", "mha(local)", "mha(linear)",
    "pos(learned)", "pos(sinusoidal)", "pos(rope)", "pos(alibi)",
    "ffn(mlp)", "ffn(glu)", "ffn(bilinear)", "ffn(reglu)", "ffn(geglu)", "ffn(swiglu)",
    "mixer(fnet)", "embed(token)", "head(lm)",
]


# The multi-stream issue (7): cross-attention, latent arrays, joining and slicing streams, T5's bias.
STREAMS = ["xattn(softmax)", "latent(array)", "cat(seq)", "slice(seq)", "pos(t5_bias)"]
# Decoding and state (issue 8): segment memories and XL's relative positions.
STATE = ["memory(xl)", "memory(rmt)", "pos(xl_rel)"]


def test_first_catalog_is_registered():
    ids = {op.id for op in REGISTRY.values()}
    assert not [c for c in CATALOG + STREAMS + STATE if c not in ids]


def test_ops_that_read_streams_name_them_in_their_params():
    """An op's `streams` are fields of its params naming a stream (a str, or None when not given)."""
    for op in REGISTRY.values():
        for f in op.streams:
            assert f in op.params.model_fields, f"{op.id}: {f} is not a parameter"
    assert REGISTRY["xattn", "softmax"].streams == ("kv",)
    assert REGISTRY["cat", "seq"].streams == ("prefix", "suffix")


def test_ops_that_begin_streams_have_no_stream_input():
    """An op that begins a stream reads only its input's batch size; one whose value is carried across
    segments begins a stream and has no step form."""
    starts = {op.id for op in REGISTRY.values() if op.starts}
    assert starts == {"latent(array)", "memory(rmt)"}
    for op in REGISTRY.values():
        assert not op.starts or (op.inputs == 1 and not op.streams)
        assert not op.carried or (op.starts and op.decode_form(None) is None)


@pytest.mark.parametrize("key", sorted(REGISTRY), ids=lambda k: f"{k[0]}({k[1]})")
def test_op_is_declared_whole(key):
    op: Op = REGISTRY[key]
    assert op.family in FAMILIES
    assert issubclass(op.params, OpParams) and issubclass(op.params, BaseModel)
    cfg = op.params.model_config
    assert cfg["frozen"] and cfg["extra"] == "forbid"
    for name, field in op.params.model_fields.items():
        assert field.description, f"{op.id}.{name} has no description"
    assert op.causal in ("yes", "no", "n.a.")
    assert callable(op.shape) and callable(op.module)
    assert op.summary.strip()
    if op.family != "input":
        assert "20" in op.paper or "JMLR" in op.paper, f"{op.id}: paper reference needs a year/venue"
    if op.family == "pos" and op.variant in ("rope", "alibi"):
        assert op.attach is not None


def test_duplicate_registration_is_an_error():
    op = REGISTRY[("norm", "layernorm")]
    with pytest.raises(ValueError, match="registered twice"):
        register(op)


def test_params_model_must_be_frozen_and_strict():
    class Loose(BaseModel):
        x: int = 1

    op = Op(family="norm", variant="loose_test", params=Loose, module=lambda p, e: torch.nn.Identity(),
            causal="n.a.", paper="x 2020", summary="x")
    with pytest.raises(ValueError, match="frozen"):
        register(op)
    assert ("norm", "loose_test") not in REGISTRY


def test_params_reject_unknown_fields_and_coercion():
    from pydantic import ValidationError

    P = REGISTRY[("mha", "softmax")].params
    with pytest.raises(ValidationError):
        P(heads=8, nonsense=1)
    with pytest.raises(ValidationError):
        P(heads="8")  # strict: no string-to-int coercion
    with pytest.raises(ValidationError):
        P(heads=0)
