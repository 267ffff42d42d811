"""The README stays true: its examples compile, its op table is the registry's, its wiring text is real."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import evodsl
from evodsl.cli import main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
EXAMPLES = re.findall(r"```evo\n(.*?)```", README, flags=re.S)


def test_readme_has_examples():
    assert len(EXAMPLES) >= 8


@pytest.mark.parametrize("i", range(len(EXAMPLES)))
def test_every_example_compiles_and_runs(i):
    """Each example builds and runs (on meta) with its output shaped as its graph says: [2, 8] for a model on
    8 positions, [2, 5] for an encoder-decoder's 5 target positions, [2, 16] for 16 latents."""
    model = evodsl.compile(EXAMPLES[i], device="meta")
    graph = evodsl.parse(EXAMPLES[i])
    xs = []
    for inp, n in zip(graph.inputs, (8, 5)):
        shape = inp.meta["shape"]
        xs.append(torch.zeros(2, n, dtype=torch.long, device="meta") if len(shape) == 2
                  else torch.zeros(2, n, shape[-1], device="meta"))
    length = graph.output.meta["shape"][1]
    want = {"n": 8, "m": 5}.get(length, length)
    assert model(*xs).shape[:2] == (2, want)


def test_op_table_is_generated(capsys):
    main(["ops", "--markdown"])
    table = capsys.readouterr().out.strip()
    inside = README.split("<!-- ops:begin -->")[1].split("<!-- ops:end -->")[0].strip()
    assert inside == table, "README op table is stale: run `evodsl ops --markdown` and paste it"


def test_card_line_wiring_text_is_what_check_prints():
    shown = README.split("as `evodsl check` shows:\n\n```\n")[1].split("```")[0].strip()
    assert str(evodsl.parse("block = norm -> mha(adaptive_span, R=32) -> ffn(glu)")) == shown


def test_spec_table_lists_every_spec():
    specs = Path(__file__).resolve().parents[1] / "specs"
    listed = set(re.findall(r"^\| `([\w/*]+)\.evo` \|", README, re.M))
    assert {p.stem for p in specs.glob("*.evo")} <= listed, "add a row to README's spec table"
