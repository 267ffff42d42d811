"""The streamed ONNX export (backends/onnx_stream.py): the graph traced on the meta device, the weights written
into external data one tensor at a time from the module. Forced on small specs here (it is the default from
2 GiB of weights): onnxruntime equals torch, every initializer in the file is the module's tensor of that name,
and float16 exports run in onnxruntime. Its memory at 7B is a benchmark (BENCHMARKS.md, bench_onnx.py)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import evodsl
from evodsl.backends.lower_onnx import export
from evodsl.cli import main

SPECS = Path(__file__).resolve().parents[1] / "specs"


def tiny(name: str, **sizes) -> str:
    text = (SPECS / f"{name}.evo").read_text(encoding="utf-8")
    for key, value in sizes.items():
        text, n = re.subn(rf"^{key}\s*=.*$", f"{key} = {value}", text, flags=re.M)
        assert n == 1, f"{name}.evo has no binding {key}"
    return text


CASES = {  # rope and GQA; a tied head and learned positions; an encoder-decoder
    "llama": tiny("llama", vocab=97, d_model=64, heads=4, d_ff=96, layers=2),
    "gpt2": tiny("gpt2", vocab=97, n_ctx=32, d_model=64, heads=4, layers=2),
    "t5": tiny("t5_small", vocab=97, d_model=32, heads=4, d_ff=64, layers=2),
}


@pytest.mark.parametrize("name", CASES)
def test_streamed_export_equals_torch_and_holds_the_module_weights(tmp_path, name):
    model = evodsl.compile(CASES[name], seed=3)
    graph = evodsl.parse(CASES[name])
    path = tmp_path / f"{name}.onnx"
    r = export(model, graph, path, stream=True)
    assert r.external_data and (tmp_path / f"{name}.onnx.data").is_file()
    assert r.max_abs_diff <= 1e-5 * r.output_scale
    proto = onnx.load(str(path))  # with its external data
    tensors = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
    assert proto.graph.initializer, "the weights are initializers"
    for init in proto.graph.initializer:
        assert np.array_equal(numpy_helper.to_array(init), tensors[init.name].detach().numpy()), init.name


def test_release_frees_the_module_before_the_check(tmp_path):
    model = evodsl.compile(CASES["llama"])
    r = export(model, evodsl.parse(CASES["llama"]), tmp_path / "m.onnx", stream=True, release=True)
    assert r.max_abs_diff <= 1e-5 * r.output_scale
    assert all(p.device.type == "meta" for p in model.parameters())


def test_float16_export_runs_in_onnxruntime(tmp_path, capsys):
    spec = tmp_path / "llama.evo"
    spec.write_text(CASES["llama"], encoding="utf-8")
    assert main(["export", str(spec), "-o", str(tmp_path / "m.onnx"), "--dtype", "float16"]) == 0
    out = capsys.readouterr().out
    rel = float(re.search(r"\(([0-9.e-]+) of the output scale", out).group(1))
    assert rel < 5e-3  # float16's rounding through two layers, not a wrong graph (float32: 1e-7)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    names = {n for n, _ in evodsl.compile(CASES["llama"], device="meta").named_parameters()}
    weights = [init for init in proto.graph.initializer if init.name in names]
    assert weights and {init.data_type for init in weights} == {onnx.TensorProto.FLOAT16}


def test_half_precision_models_are_drawn_without_a_float32_copy():
    """lower() draws a float16 model's weights in float16: the same shapes, and values of that precision."""
    half = evodsl.compile(CASES["llama"], dtype=torch.float16)
    full = evodsl.compile(CASES["llama"])
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    assert [p.shape for p in half.parameters()] == [p.shape for p in full.parameters()]
    ids = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        assert torch.isfinite(half(ids)).all()


@pytest.mark.parametrize("name, fused", [
    ("gpt2", {"Attention", "LayerNormalization"}),
    ("llama", {"Attention", "RMSNormalization", "RotaryEmbedding"}),
])
def test_opset_23_fuses_attention_norms_and_rotary(tmp_path, name, fused):
    """At opset 23 the exporter writes ONNX's Attention and RMSNormalization, and pos(rope) its RotaryEmbedding
    (halves and interleaved pairs, partial rotation); onnxruntime runs them and equals torch."""
    spec = CASES[name]
    if name == "llama":  # HF's layout, half the channels turned
        spec = spec.replace("pos(rope)", "pos(rope, pairs=halves, fraction=0.5)")
    path = tmp_path / f"{name}.onnx"
    r = export(evodsl.compile(spec), evodsl.parse(spec), path, opset=23)
    assert r.opset == 23 and r.max_abs_diff <= 1e-5 * r.output_scale
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert fused <= ops and "Softmax" not in ops
    if name == "llama":  # the paper's interleaved pairs as well, full rotation
        spec = CASES["llama"]
        r = export(evodsl.compile(spec), evodsl.parse(spec), tmp_path / "i.onnx", opset=23)
        assert r.max_abs_diff <= 1e-5 * r.output_scale
        assert "RotaryEmbedding" in {n.op_type for n in onnx.load(str(tmp_path / "i.onnx")).graph.node}
