"""`evodsl cost` against measurement, on every spec: params exact, FLOPs within 1% of FlopCounterMode (CPU SDPA
registered), activation memory within 10% of the storage tracker, for inference and for training."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import evodsl
from evodsl.cli import main
from evodsl.measure import count_flops, measure_memory, register_cpu_sdpa_flops

SPECS = sorted((Path(__file__).resolve().parents[1] / "specs").glob("*.evo"))
IDS = [p.stem for p in SPECS]
# Small sizes for measuring with real weights (only the bindings a spec has are overridden).
SMALL = {"d_model": 64, "heads": 4, "kv_heads": 2, "layers": 2, "vocab": 97, "d_ff": 128, "max_span": 48, "n_ctx": 256,
         "max_len": 256, "window": 16}


def small(spec: Path) -> dict:
    bound = evodsl.parse(spec)  # noqa: F841 - validates the spec as written first
    text = spec.read_text()
    return {k: v for k, v in SMALL.items() if any(line.split("=")[0].strip() == k for line in text.splitlines())}


def full_spans(model):
    """Adaptive span declares the cost of its full max_span band (an upper bound: learned spans shorter than
    max_span shrink the band at run time); measure it at that bound."""
    for mod in model.modules():
        if hasattr(mod, "spans") and hasattr(mod, "span"):
            with torch.no_grad():
                mod.span.fill_(1.0)
    return model


def model_input(graph, b, n, device="cpu"):
    shape = graph.input.meta["shape"]
    if len(shape) == 2:
        return torch.randint(0, graph.input.params.vocab, (b, n), device=device)
    return torch.randn(b, n, shape[-1], device=device)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_params_exact(spec):
    model = evodsl.compile(spec, device="meta")
    assert evodsl.cost(spec)["params"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("b,n", [(1, 64), (2, 96)])
def test_forward_flops_full_size_on_meta(spec, b, n):
    """Full-size specs (7B included) on the meta device: nothing is allocated, FLOPs are counted."""
    register_cpu_sdpa_flops()
    graph = evodsl.parse(spec)
    model = evodsl.compile(spec, device="meta")
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(model_input(graph, b, n, device="meta"))
    declared = evodsl.cost(spec, seq=n, batch=b)["flops"]["forward_matmul"]
    assert declared == pytest.approx(fc.get_total_flops(), rel=0.01)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("b,n", [(1, 40), (2, 72)])
def test_train_flops_small(spec, b, n):
    over = small(spec)
    graph = evodsl.parse(spec, over)
    model = full_spans(evodsl.compile(spec, overrides=over).train())
    measured = count_flops(model, model_input(graph, b, n), train=True)
    declared = evodsl.cost(spec, seq=n, batch=b, overrides=over)["flops"]
    assert declared["forward_matmul"] == pytest.approx(measured["forward"], rel=0.01)
    assert declared["backward_matmul"] == pytest.approx(measured["backward"], rel=0.01)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("b,n", [(1, 48), (2, 96)])
def test_activation_memory_small(spec, b, n):
    over = small(spec)
    graph = evodsl.parse(spec, over)
    model = full_spans(evodsl.compile(spec, overrides=over).train())
    measured = measure_memory(model, model_input(graph, b, n))
    mem = evodsl.cost(spec, seq=n, batch=b, overrides=over)["memory"]
    assert mem["activations_inference"] == pytest.approx(measured.inference_peak, rel=0.10)
    assert mem["activations_training"] == pytest.approx(measured.training_saved, rel=0.10)
    assert mem["activations_training_peak"] == pytest.approx(measured.training_peak, rel=0.10)


def test_gpt2_forward_flops_match_hf_at_1024():
    """HF GPT-2 small under FlopCounterMode with the CPU SDPA formula registered, at seq 1024."""
    transformers = pytest.importorskip("transformers")
    register_cpu_sdpa_flops()
    cfg = transformers.GPT2Config(attn_implementation="sdpa", use_cache=False)
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf = hf.to_empty(device="cpu")
    ids = torch.zeros(1, 1024, dtype=torch.long)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        hf(input_ids=ids)
    ours = evodsl.cost("specs/gpt2.evo", seq=1024)["flops"]
    assert ours["forward_matmul"] == pytest.approx(fc.get_total_flops(), rel=0.01)
    assert ours["forward_other"] > 0  # softmax, norms, GELU, adds: counted, shown separately


def test_json_schema(capsys):
    assert main(["cost", "specs/gpt2.evo", "--seq", "256", "--batch", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["seq"] == 256 and data["batch"] == 2 and data["dtype"] == "float32"
    assert isinstance(data["params"], int)
    assert {"forward", "backward"} <= set(data["flops"]) and all(isinstance(v, int) for v in data["flops"].values())
    assert {"params", "activations_inference", "activations_training", "kv_cache"} <= set(data["memory"])
    assert data["memory"]["params"] == 4 * data["params"]
    assert set(data["complexity"]) == {"time", "memory"}
    assert data["layers"] and all({"name", "op", "count", "params", "flops"} <= set(L) for L in data["layers"])
    assert sum(L["params"] for L in data["layers"]) == data["params"]


def test_dtype_halves_memory():
    f32 = evodsl.cost("specs/llama.evo", seq=512, dtype="float32")
    bf16 = evodsl.cost("specs/llama.evo", seq=512, dtype="bfloat16")
    assert bf16["memory"]["params"] * 2 == f32["memory"]["params"]
    assert bf16["memory"]["kv_cache"] * 2 == f32["memory"]["kv_cache"]
    assert bf16["flops"] == f32["flops"]


def test_kv_cache_of_llama_is_the_textbook_number():
    c = evodsl.cost("specs/llama.evo", seq=4096, batch=1, dtype="float16")
    assert c["memory"]["kv_cache"] == 2 * 32 * 4096 * 4096 * 2  # K and V, 32 layers, n, d, 2 bytes


@pytest.mark.parametrize("spec,time,memory", [
    ("gpt2", "O(n^2 d)", None),
    ("llama", "O(n^2 d)", None),
    ("linear_transformer", None, None),
])
def test_complexity_classes(spec, time, memory):
    c = evodsl.cost(f"specs/{spec}.evo")["complexity"]
    if time:
        assert c["time"] == time
    assert c["time"].startswith("O(n")
    if memory:
        assert c["memory"] == memory


def test_sweep_and_crossover(capsys):
    assert main(["cost", "specs/gpt2.evo", "specs/linear_transformer.evo", "--seq", "1k,4k,16k"]) == 0
    out = capsys.readouterr().out
    assert "crossover" in out and "16384" in out


def test_shared_weights_counted_once():
    spec = "d_model = 32\nheads = 4\nblock = norm -> mha -> norm -> ffn\nstack = repeat(block, 6, shared=true)"
    model = evodsl.compile(spec)
    c = evodsl.cost(spec, seq=16)
    assert c["params"] == sum(p.numel() for p in model.parameters())
