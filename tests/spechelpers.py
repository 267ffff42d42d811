"""Shared by the spec-level tests: the specs in specs/, small sizes to run them with real weights, inputs."""
from __future__ import annotations

from pathlib import Path

import torch

import evodsl
from evodsl.backends.lower_onnx import min_positions

SPECS = sorted((Path(__file__).resolve().parents[1] / "specs").glob("*.evo"))
IDS = [p.stem for p in SPECS]
min_length = min_positions  # the shortest input a model takes
# Small sizes for running a spec with real weights (only the bindings a spec has are overridden). n_ctx and
# max_len leave room for sequences that span several of the attention kernels' 32-query blocks and 64-token
# chunks; window and max_span are short, so that such a sequence spans several bands too.
SMALL = {"d_model": 64, "heads": 4, "kv_heads": 2, "layers": 2, "vocab": 97, "d_ff": 128, "max_span": 48, "n_ctx": 256,
         "max_len": 256, "window": 16, "latents": 5, "n_memory": 3, "mem_len": 24, "d_inner": 128,
         "bblock": 2,  # bigbird_base: blocks of 2, so that the tests' shortest sequences have more blocks than globals
         "n_global": 4, "l_radius": 6, "g_block": 4,  # etc_base, long_context/etc: 4 global tokens (256 would drown
#                                                        a token's dependence on the others at 12 positions), short bands
         "pairs": 1, "head_dim": 32,  # gemma2_2b: one local + global pair (2 layers); heads of 32, h dh = 2 d (wide
#                                       heads, as Gemma 7B's; 256 made its leak test run 100 s)
         "axial_d1": 16, "axial_d2": 48,  # reformer: axial positions of 16 + 48 features, one local + LSH pair,
         "copies": 1, "local_chunk": 16, "lsh_chunk": 16, "buckets": 8,  # chunks of 16, 8 buckets
         "groups": 1}  # hybrid_gated_deltanet: one group (three Gated DeltaNet layers, one attention layer)


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


class Steady(torch.nn.Module):
    """A model with a segment memory (memory(xl)) in the steady state its cost declares: every call is a segment
    after ones that filled the memory (a copy of a warmed state each call). Others are returned as they are."""

    def __init__(self, model, state):
        super().__init__()
        self.model, self.state = model, state

    def forward(self, ids, *rest):
        from evodsl.segments import SegmentState

        return self.model.recur(ids, SegmentState(dict(self.state.memory)))[0]

    def input_modules(self) -> list:
        return self.model.input_modules()


def steady(model, inputs: list):
    mem = max((getattr(m, "mem_len", 0) for m in model.modules()), default=0)
    if not mem:
        return model
    ids = inputs[0]
    with torch.no_grad():
        _, state = model.recur(torch.zeros(ids.shape[0], mem, dtype=ids.dtype, device=ids.device))
    return Steady(model, state)


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


def assert_hf_config_refused(config: dict, key: str, says: str, tmp_path) -> None:
    """evodsl.from_hf refuses the HF config (written as config.json) with E415, the message saying `says` and a
    caret under the quoted `key`, located in the file."""
    import json

    import pytest

    path = tmp_path / "config.json"
    path.write_text(json.dumps(config, indent=2))
    with pytest.raises(evodsl.EvoError, match="E415") as err:
        evodsl.from_hf(path)
    text = str(err.value)
    assert "config.json:" in text and says in text and "^" * (len(key) + 2) in text, text
