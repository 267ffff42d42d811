"""`evodsl diff A B` and evodsl.diff: the structural diff of two specs' graphs and their cost delta."""
from __future__ import annotations

import json

import pytest

import evodsl
from evodsl.cli import main
from evodsl.diff import diff, render, structural_diff

BASE = """\
vocab = 100
d_model = 32
heads = 4
block = norm -> mha -> norm -> ffn
model lm(causal=true) = input(tokens) -> embed(token) -> pos(learned, max_len=256) -> repeat(block, 2) -> norm -> head(lm)
"""


def edit(old: str, new: str) -> str:
    assert old in BASE
    return BASE.replace(old, new)


def ops(a: str, b: str) -> list[dict]:
    return structural_diff(evodsl.parse(a), evodsl.parse(b))


def test_the_same_spec_has_no_changes_and_a_zero_delta():
    d = diff(BASE, BASE, seq=64)
    assert d["ops"] == []
    assert all(v["delta"] == 0 for v in d["cost"].values() if "delta" in v)
    assert "(the same ops and parameters)" in render(d)


def test_defaults_written_out_are_no_change():
    """`mha` and `mha(softmax, heads=4)` with heads = 4 build the same op: the diff compares values, not text."""
    assert ops(BASE, edit("-> mha ->", "-> mha(softmax, heads=4) ->")) == []


def test_a_parameter_change_names_the_op_path_and_both_values():
    assert ops(BASE, edit("-> mha ->", "-> mha(kv_heads=2) ->")) == [
        {"change": "changed", "path": "blocks.*.attn", "op": "mha(softmax)", "params": {"kv_heads": [None, 2]}}]


def test_an_inserted_op_is_one_addition_not_a_cascade():
    """A norm inserted before the head: the ops after it are aligned by op, not reported as changed."""
    got = ops(BASE, edit("-> norm -> head(lm)", "-> norm -> ffn -> norm -> head(lm)"))
    assert [(c["change"], c["path"], c["op"]) for c in got] == [("added", "ffn", "ffn(mlp)"),
                                                                ("added", "norm2", "norm(layernorm)")]
    removed = ops(BASE, edit("-> pos(learned, max_len=256) ", ""))
    assert [(c["change"], c["path"], c["op"]) for c in removed] == [("removed", "pos", "pos(learned)")]
    assert removed[0]["params"]["max_len"] == 256


def test_a_swapped_variant_is_replaced_with_the_parameters_that_matter():
    got = ops(BASE, edit("-> mha ->", "-> mha(local, window=16) ->"))
    assert got == [{"change": "replaced", "path": "blocks.*.attn", "was": "mha(softmax)", "op": "mha(local)",
                    "params": {"window": [None, 16]}}]


def test_repeat_count_and_sharing():
    got = ops(BASE, edit("repeat(block, 2)", "repeat(block, 6, shared=true)"))
    assert got == [{"change": "changed", "path": "blocks", "op": "repeat",
                    "params": {"count": [2, 6], "shared": [False, True]}}]


def test_the_cost_delta_is_evodsl_cost_of_each():
    b = edit("-> mha ->", "-> mha(local, window=16, kv_heads=1) ->")
    d = diff(BASE, b, seq=512, batch=2)
    ca, cb = evodsl.cost(BASE, seq=512, batch=2), evodsl.cost(b, seq=512, batch=2)
    assert d["cost"]["params"] == {"a": ca["params"], "b": cb["params"], "delta": cb["params"] - ca["params"],
                                   "ratio": cb["params"] / ca["params"]}
    assert d["cost"]["forward FLOPs"]["delta"] == cb["flops"]["forward"] - ca["flops"]["forward"] < 0
    assert d["cost"]["KV cache"]["b"] == cb["memory"]["kv_cache"] < ca["memory"]["kv_cache"]
    assert d["cost"]["complexity (time)"] == {"a": ca["complexity"]["time"], "b": cb["complexity"]["time"]}


def test_cli_text_and_json(tmp_path, capsys):
    a, b = tmp_path / "a.evo", tmp_path / "b.evo"
    a.write_text(BASE)
    b.write_text(edit("repeat(block, 2)", "repeat(block, 3)"))
    assert main(["diff", str(a), str(b), "--seq", "128"]) == 0
    out = capsys.readouterr().out
    assert f"--- {a}" in out and "~ blocks: repeat: count 2 -> 3" in out and "cost at seq 128, batch 1" in out
    assert main(["diff", str(a), str(b), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["ops"] == [{"change": "changed", "path": "blocks", "op": "repeat", "params": {"count": [2, 3]}}]
    assert d["cost"]["params"]["ratio"] > 1


def test_cli_bad_spec_exits_1_with_the_location(tmp_path, capsys):
    a, b = tmp_path / "a.evo", tmp_path / "b.evo"
    a.write_text(BASE)
    b.write_text(edit("-> mha ->", "-> mha(heads=3) ->"))
    assert main(["diff", str(a), str(b)]) == 1
    err = capsys.readouterr().err
    assert f"{b}:4:" in err and "^" in err and "help" in err
    assert main(["diff", str(a), str(tmp_path / "missing.evo")]) == 1
    assert "cannot read spec" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["diff"], ["diff", "a.evo"], ["diff", "a.evo", "b.evo", "--seq", "0"]])
def test_cli_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
