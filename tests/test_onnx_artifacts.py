"""ONNX artifacts (evodsl.export): trained weights exported and refused from another spec; a failed export names
the op and leaves no file; external data beside a large model and the memory refusal before any weight is
built; the CLI. (The per-op and per-spec numeric checks are in test_onnx.py.)"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import evodsl
import evodsl.backends.lower_onnx as lower_onnx
import evodsl.backends.lower_torch as lower_torch
from evodsl.backends.lower_onnx import example_input
from evodsl.cli import main
from ophelpers import perturb_params
from spechelpers import small
from test_onnx import HEADER, OP_CASES, TOL, run

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- weights

WEIGHTS_SPEC = (HEADER + "model m(causal=true) = input(features, d=32) -> pos(rope)"
                " -> residual(norm(rmsnorm) -> mha, scale=rezero)"
                " -> parallel(mha(local, window=5), ffn(swiglu), merge=concat) -> head(linear, d_out=8)\n")


def test_weights_artifact_is_exported(tmp_path):
    model = evodsl.compile(WEIGHTS_SPEC)
    perturb_params(model, scale=0.3)  # rezero's alpha, among others, away from its initial 0
    evodsl.save(model, tmp_path / "w.pt")
    r = evodsl.export(WEIGHTS_SPEC, tmp_path / "w.onnx", weights=tmp_path / "w.pt")
    session = ort.InferenceSession(str(r.path), providers=["CPUExecutionProvider"])
    loaded = evodsl.load(tmp_path / "w.pt")
    default = evodsl.compile(WEIGHTS_SPEC)
    graph = evodsl.parse(WEIGHTS_SPEC)
    for b, n in ((1, 9), (3, 40)):
        x = example_input(graph, b, n, seed=n)
        with torch.no_grad():
            want, other = loaded(x).numpy(), default(x).numpy()
        got = run(session, x)
        scale = float(np.abs(want).max())
        assert np.abs(got - want).max() <= TOL * scale
        assert np.abs(got - other).max() > 1e-2 * scale  # the artifact's weights, not the seed's


def test_weights_from_another_spec_are_refused(tmp_path):
    evodsl.save(evodsl.compile(WEIGHTS_SPEC), tmp_path / "w.pt")
    other = WEIGHTS_SPEC.replace("ffn(swiglu)", "ffn(geglu)")
    with pytest.raises(evodsl.EvoError) as err:
        evodsl.export(other, tmp_path / "w.onnx", weights=tmp_path / "w.pt")
    assert [d.code for d in err.value.diagnostics] == ["E408"]
    assert "built from another spec" in err.value.render()
    assert sorted(os.listdir(tmp_path)) == ["w.pt"]


# ---------------------------------------------------------------- failures leave nothing behind

GPT2 = ROOT / "specs" / "gpt2.evo"


def test_failed_export_names_the_op_and_leaves_no_file(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("Failed to convert 'aten.some_op.default' (in blocks.0.attn): no ONNX decomposition\n"
                           "  a long exporter trace follows")

    monkeypatch.setattr(torch.onnx, "export", broken)
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(evodsl.EvoError) as err:
        evodsl.export(GPT2, tmp_path / "m.onnx", overrides=small(GPT2))
    [diag] = err.value.diagnostics
    assert diag.code == "E406"
    assert "aten.some_op" in diag.message and "blocks.0.attn" in diag.message
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]  # no model, no hidden temporary folder

    args = ["export", str(GPT2), "-o", str(tmp_path / "m.onnx")] + [f"--set={k}={v}" for k, v in small(GPT2).items()]
    assert main(args) == 1
    out, errtext = capsys.readouterr()
    assert "error[E406]" in errtext and "aten.some_op" in errtext and "blocks.0.attn" in errtext
    assert "Traceback" not in out + errtext
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]


def test_graph_valid_at_some_lengths_only_is_refused(tmp_path):
    """A module whose trace depends on n (a Python branch on n % 4) would give a file that is wrong at other
    lengths (torch.onnx.export keeps such guards as runtime asserts, which the ONNX graph drops): E406 instead."""
    src = HEADER + "model m(causal=true) = input(features, d=32) -> norm -> head(linear, d_out=8)\n"
    model, graph = evodsl.compile(src), evodsl.parse(src)
    norm = model.norm.forward
    model.norm.forward = lambda x, ctx=None: norm(x, ctx) if x.shape[1] % 4 == 0 else norm(x, ctx) * 2
    with pytest.raises(evodsl.EvoError) as err:
        lower_onnx.export(model, graph, tmp_path / "m.onnx")
    [diag] = err.value.diagnostics
    assert diag.code == "E406" and "holds only where" in diag.message and "% 4" in diag.message, diag.message
    assert os.listdir(tmp_path) == []


def test_failed_check_leaves_no_file(tmp_path, monkeypatch):
    """onnxruntime failing on the written model (E407): the temporary folder holding it is removed."""
    def broken(*args, **kwargs):
        raise RuntimeError("cannot run this model")

    monkeypatch.setattr(ort, "InferenceSession", broken)
    with pytest.raises(evodsl.EvoError) as err:
        evodsl.export(OP_CASES[0].source, tmp_path / "m.onnx")
    assert [d.code for d in err.value.diagnostics] == ["E407"]
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- large models

def test_external_data_lands_beside_the_model(tmp_path, monkeypatch):
    """Weights at or over TWO_GB go to a data file beside the .onnx (protobuf's 2 GB limit); shrunk here."""
    monkeypatch.setattr(lower_onnx, "TWO_GB", 1024)
    out = tmp_path / "out"
    out.mkdir()
    r = evodsl.export(GPT2, out / "gpt2.onnx", overrides=small(GPT2))
    assert r.external_data
    files = sorted(os.listdir(out))
    assert files[0] == "gpt2.onnx" and len(files) == 2, files  # the model and its data file, nothing else
    proto = onnx.load(str(out / "gpt2.onnx"), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    assert locations == {files[1]}  # a relative name: the pair can move together
    assert r.bytes == sum((out / f).stat().st_size for f in files)
    moved = tmp_path / "moved"
    out.rename(moved)
    session = ort.InferenceSession(str(moved / "gpt2.onnx"), providers=["CPUExecutionProvider"])
    graph = evodsl.parse(GPT2, small(GPT2))
    x = example_input(graph, 2, 20)
    with torch.no_grad():
        want = evodsl.compile(GPT2, overrides=small(GPT2))(x).numpy()
    assert np.abs(run(session, x) - want).max() <= TOL * np.abs(want).max()


def _no_weights(*args, **kwargs):
    raise AssertionError("weights were built")


@pytest.mark.parametrize("spec", ["llama", "llama2_70b"])
def test_big_model_is_refused_before_any_weight_is_built(spec, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lower_onnx, "_available_memory", lambda: 24 * 2**30)
    monkeypatch.setattr(lower_torch, "lower", _no_weights)
    path = ROOT / "specs" / f"{spec}.evo"
    params = evodsl.cost(path)["params"]
    need = f"{(params * 4 + lower_onnx.STREAM_MARGIN) / 2**30:.1f} GiB"  # streamed: the weights once, a margin
    start = time.perf_counter()
    with pytest.raises(evodsl.EvoError) as err:
        evodsl.export(path, tmp_path / "m.onnx")
    [diag] = err.value.diagnostics
    assert diag.code == "E405"
    assert f"needs about {need}" in diag.message and "has 24.0 GiB available" in diag.message
    assert f"{params * 4 / 2**30:.1f} GiB" in diag.help  # the weights alone

    assert main(["export", str(path), "-o", str(tmp_path / "m.onnx")]) == 1
    _, errtext = capsys.readouterr()
    assert "error[E405]" in errtext and need in errtext and "Traceback" not in errtext
    assert time.perf_counter() - start < 15  # parse and count only
    assert os.listdir(tmp_path) == []
    if spec == "llama":  # 7B in float16: 12.6 GiB of weights + the margin fit 24 GiB, so the export goes on
        with pytest.raises(AssertionError, match="weights were built"):
            evodsl.export(path, tmp_path / "m.onnx", dtype="float16")


def test_small_exports_are_judged_by_the_exporter_copies(monkeypatch):
    """Below 2 GiB of weights torch's exporter runs on the module itself and holds ~3 more copies: the check
    counts EXPORT_MEMORY_FACTOR times the weights."""
    monkeypatch.setattr(lower_onnx, "_available_memory", lambda: 3 * 2**30)
    graph = evodsl.parse(ROOT / "specs" / "gpt2.evo")
    with pytest.raises(evodsl.EvoError, match="needs about 3.4 GiB"):
        lower_onnx.check_memory(graph, int(0.8 * 2**30))
    lower_onnx.check_memory(graph, int(0.7 * 2**30))  # 2.9 GiB: fits


def test_enough_memory_goes_on_to_build_the_weights(tmp_path, monkeypatch):
    """With plenty of memory reported the check lets the 7B export through: stopped where the weights would be
    built, so none are."""
    class Built(Exception):
        pass

    def stop(*args, **kwargs):
        raise Built

    monkeypatch.setattr(lower_onnx, "_available_memory", lambda: 1 << 40)
    monkeypatch.setattr(lower_torch, "lower", stop)
    with pytest.raises(Built):
        evodsl.export(ROOT / "specs" / "llama.evo", tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- the command line

def test_cli_export_console_script(tmp_path):
    script = Path(sys.executable).with_name("evodsl")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    sets = [f"--set={k}={v}" for k, v in small(GPT2).items()]
    done = subprocess.run([script, "export", "specs/gpt2.evo", "-o", str(tmp_path / "g.onnx"), *sets], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp_path / 'g.onnx'}" in done.stdout and "max abs difference" in done.stdout
    assert os.listdir(tmp_path) == ["g.onnx"]


def test_cli_compile_backend_onnx(tmp_path, capsys):
    sets = [f"--set={k}={v}" for k, v in small(GPT2).items()]
    assert main(["compile", str(GPT2), "--backend", "onnx", "-o", str(tmp_path / "g.onnx"), *sets]) == 0
    out = capsys.readouterr().out
    assert "max abs difference" in out and "inputs 'input_ids' [batch, seq]" in out and "output 'logits'" in out
    assert os.listdir(tmp_path) == ["g.onnx"]


def test_cli_onnx_backend_needs_an_output_file(capsys):
    assert main(["compile", str(GPT2), "--backend", "onnx"]) == 2
    assert "-o FILE.onnx" in capsys.readouterr().err
