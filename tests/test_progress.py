"""Progress of long CLI work: drawn on a terminal (here: a stream handed to progress.enable), nothing when
stderr is piped, and nothing from the library unless the CLI turned it on."""
from __future__ import annotations

import io

import pytest

import evodsl
from evodsl import progress
from evodsl.backends.lower_onnx import export
from evodsl.cli import main
from test_onnx_stream import CASES


@pytest.fixture
def shown():
    out = io.StringIO()
    progress.enable(out)
    yield out
    progress.disable()


def test_steps_count_up_and_done_clears_the_line(shown):
    for i in range(1, 5):
        progress.step("loading weights", i, 4)
    progress.phase("checking")
    progress.done()
    text = shown.getvalue()
    assert "loading weights [" in text and "] 1/4" in text and "] 4/4" in text
    assert "checking ..." in text and text.endswith("\r\x1b[K")


def test_off_by_default_in_the_library(capsys):
    progress.step("loading weights", 1, 1)
    progress.phase("exporting")
    assert capsys.readouterr() == ("", "")


def test_a_streamed_export_shows_each_weight_written(shown, tmp_path):
    model = evodsl.compile(CASES["gpt2"])
    export(model, evodsl.parse(CASES["gpt2"]), tmp_path / "m.onnx", stream=True)
    text = shown.getvalue()
    import onnx

    total = len(onnx.load(str(tmp_path / "m.onnx"), load_external_data=False).graph.initializer)
    assert "exporting the graph ..." in text and "checking the file" in text
    last = text.rsplit("writing weights [", 1)[1]
    done, of = last.split("] ", 1)[1].split("\r", 1)[0].split("/")
    assert done == of == str(total)  # every initializer of the file counted, the last drawn
    assert text.endswith("\r\x1b[K")  # the line cleared before the command prints its result


def test_hf_weights_loading_shows_progress(shown):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    hf = transformers.GPT2LMHeadModel(config)
    ours = evodsl.compile(evodsl.from_hf(config))
    evodsl.load_hf(ours, hf.state_dict(), config)
    assert "loading weights [" in shown.getvalue() and shown.getvalue().endswith("\r\x1b[K")


def test_the_cli_draws_nothing_when_stderr_is_not_a_terminal(tmp_path, capsys):
    spec = tmp_path / "m.evo"
    spec.write_text(CASES["gpt2"])
    assert main(["export", str(spec), "-o", str(tmp_path / "m.onnx")]) == 0
    out, err = capsys.readouterr()
    assert "\r" not in out + err and "\x1b" not in out + err and out.startswith("wrote ")
