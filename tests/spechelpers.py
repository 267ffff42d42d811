"""Shared by the spec-level tests: the specs in specs/, small sizes to run them with real weights, inputs."""
from __future__ import annotations

from pathlib import Path

import torch

import evodsl
from evodsl.backends.lower_onnx import min_positions as min_length  # noqa: F401 - the shortest input a model takes

SPECS = sorted((Path(__file__).resolve().parents[1] / "specs").glob("*.evo"))
IDS = [p.stem for p in SPECS]
# Small sizes for running a spec with real weights (only the bindings a spec has are overridden). n_ctx and
# max_len leave room for sequences that span several of the attention kernels' 32-query blocks and 64-token
# chunks; window and max_span are short, so that such a sequence spans several bands too.
SMALL = {"d_model": 64, "heads": 4, "kv_heads": 2, "layers": 2, "vocab": 97, "d_ff": 128, "max_span": 48, "n_ctx": 256,
         "max_len": 256, "window": 16, "latents": 5, "memory": 3}


def small(spec: Path) -> dict:
    """The SMALL overrides for the bindings `spec` has."""
    evodsl.parse(spec)  # validates the spec as written first
    text = spec.read_text()
    return {k: v for k, v in SMALL.items() if any(line.split("=")[0].strip() == k for line in text.splitlines())}


def full_spans(model):
    """Adaptive span declares the cost of its full max_span band (an upper bound: learned spans shorter than
    max_span shrink the band at run time); set every span to that bound."""
    for mod in model.modules():
        if hasattr(mod, "spans") and hasattr(mod, "span"):
            with torch.no_grad():
                mod.span.fill_(1.0)
    return model


def model_inputs(graph, b, n, m=None, device="cpu", generator=None) -> list:
    """The model's inputs: [x], or [source of n tokens, target of m (default n)] for an encoder-decoder."""
    xs = [model_input(graph, b, n, device, generator)]
    if len(graph.inputs) > 1:
        inp = graph.inputs[1]
        xs.append(torch.randint(0, inp.params.vocab, (b, m or n), generator=generator).to(device))
    return xs


def output_input(graph) -> int:
    """Which input the output's positions are those of: the target's (1) in an encoder-decoder, else 0."""
    st = graph.streams[-1] if graph.streams else None
    while st is not None and st.source[0] == "stream":
        st = graph.stream(st.source[1])
    names = [n.name for n in graph.inputs]
    return names.index(st.source[1]) if st is not None and st.source[0] == "input" else 0


def output_causal(graph) -> bool:
    """The output's stream is causal (the model's option, for a model without streams)."""
    return graph.streams[-1].causal if graph.streams else bool(graph.options.get("causal"))


def model_input(graph, b, n, device="cpu", generator=None):
    shape = graph.input.meta["shape"]
    if len(shape) == 2:
        return torch.randint(0, graph.input.params.vocab, (b, n), generator=generator).to(device)
    return torch.randn(b, n, shape[-1], generator=generator).to(device)
