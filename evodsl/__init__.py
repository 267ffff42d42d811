"""evodsl: declare a Transformer variant in a few lines, check it, and build it as a PyTorch module.

    import evodsl
    graph = evodsl.parse("specs/gpt2.evo")        # validated graph IR; print(graph) shows it
    model = evodsl.compile("specs/gpt2.evo")      # torch.nn.Module: input_ids [b, n] -> logits [b, n, vocab]

Every problem in a spec raises one `EvoError` whose `.diagnostics` list each with file:line:col.
"""
from __future__ import annotations

from pathlib import Path

from .diagnostics import Diagnostic, EvoError, Span
from .init import ngpt_normalize_
from .ir import Graph
from .ops import load_all
from .passes.build import build
from .passes.reuse import link_reuse
from .passes.shapes import infer_shapes
from .syntax import parse_program

__all__ = ["ngpt_normalize_", "EvoError", "Diagnostic", "Span", "Graph", "parse", "compile", "cost", "export", "save", "load",
           "read_source", "from_hf", "load_hf"]
__version__ = "0.1.0"

ARTIFACT_FORMAT = "evodsl-torch/1"


def read_source(text_or_path) -> tuple[str, str]:
    """(source text, file name). A Path, or a one-line string ending in .evo, is read as a file."""
    if isinstance(text_or_path, Path) or (isinstance(text_or_path, str) and "\n" not in text_or_path
                                          and text_or_path.strip().endswith(".evo")):
        path = Path(text_or_path)
        try:
            return path.read_text(encoding="utf-8"), str(text_or_path)
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
            raise EvoError([Diagnostic("E401", f"cannot read spec {str(text_or_path)!r}: {reason}",
                                       help="pass a path to a .evo file, or the spec text itself")]) from None
    if not isinstance(text_or_path, str):
        raise EvoError([Diagnostic("E401", f"expected spec text or a path, got {type(text_or_path).__name__}")])
    return text_or_path, "<string>"


def parse(text_or_path, overrides: dict | None = None) -> Graph:
    """Parse and validate a spec: returns the graph IR with shapes inferred, or raises EvoError.
    `overrides` ({"d_model": 256, ...}) replace the values of the spec's bindings of those names."""
    load_all()
    source, file = read_source(text_or_path)
    program = parse_program(source, file)
    graph, collector = build(program, overrides)
    collector.raise_if_any()
    link_reuse(graph, collector)  # mha(skip_reuse): the attention each one reads (on a graph built whole)
    infer_shapes(graph, collector)
    collector.raise_if_any()
    graph.lint()
    graph.source, graph.file, graph.overrides = source, file, dict(overrides or {})
    return graph


def compile(text_or_path, backend: str = "torch", seed: int = 0, device=None, dtype=None,  # noqa: A001
            overrides: dict | None = None, weights=None, checkpoint: bool = False):
    """Build a spec. backend="torch" returns an nn.Module (eval mode) with weights drawn from `seed`;
    device="meta" builds the structure without allocating weights. `weights`: an artifact (`save`), or an HF
    checkpoint (a folder with config.json and *.safetensors, or one .safetensors file beside a config.json)
    loaded with `load_hf`. checkpoint=True recomputes each repeat copy in backward instead of keeping its
    activations (evodsl.distributed.checkpoint; `evodsl cost --train` shows the saving)."""
    if backend != "torch":
        raise EvoError([Diagnostic("E402", f"unknown backend {backend!r}", help="available backends: torch")])
    graph = parse(text_or_path, overrides)
    model = _model(graph, seed, weights, device=device, dtype=dtype)
    if checkpoint:
        from .distributed import checkpoint as _checkpoint

        _checkpoint(model)
    return model


def _model(graph, seed: int, weights=None, device=None, dtype=None):
    """The graph's module, with weights from `seed`, an artifact, or an HF checkpoint."""
    from .backends.lower_torch import lower
    from .hf import load_hf, read_checkpoint

    checkpoint = read_checkpoint(weights) if weights is not None else None
    if weights is not None and checkpoint is None:
        model = load(weights, device=device)
        if str(parse(model.spec, getattr(model, "overrides", None))) != str(graph):
            raise EvoError([Diagnostic("E408", f"the weights in {weights} were built from another spec "
                                               f"('{model.graph_name}' from {model.spec_file})",
                                       help="use the spec the artifact was compiled from, or recompile it")])
        return model if dtype is None else model.to(dtype)
    model = lower(graph, seed=seed, device=device, dtype=dtype, spec=graph.source, file=graph.file)
    model.overrides = graph.overrides
    if checkpoint is not None:
        load_hf(model, *checkpoint)
    return model


def from_hf(config) -> str:
    """The .evo text of the Hugging Face model a config describes (a dict, a PretrainedConfig, a config.json or
    a folder holding one): GPT-2, LLaMA 1-3, Mistral, Gemma, Phi-3, BERT, T5, BART. A feature with no evodsl form raises
    EvoError (E415) naming it and its config key."""
    from .hf import from_hf as _from_hf

    return _from_hf(config)


def load_hf(model, hf_state, config):
    """Copy an HF state dict (or a safetensors file / folder) into a model compiled from `from_hf(config)`,
    converting layouts; one EvoError (E416) lists every missing, unexpected or mis-shaped tensor."""
    from .hf import load_hf as _load_hf

    return _load_hf(model, hf_state, config)


def cost(text_or_path, seq: int = 1024, batch: int = 1, dtype: str = "float32", overrides: dict | None = None,
         decoder_seq: int | None = None) -> dict:
    """Parameters, FLOPs, memory and complexity of a spec at (batch, seq), computed from the graph alone:
    the same data as `evodsl cost --json`. An encoder-decoder's target length is `decoder_seq` (default seq).
    No weights are built."""
    from .passes.cost import DTYPE_BYTES
    from .report import build_report, cost_data

    if dtype not in DTYPE_BYTES:
        raise EvoError([Diagnostic("E404", f"unknown dtype {dtype!r}", help=f"one of: {', '.join(DTYPE_BYTES)}")])
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
               for v in (seq, batch, 1 if decoder_seq is None else decoder_seq)):
        raise EvoError([Diagnostic("E404", f"seq, decoder_seq and batch must be whole numbers >= 1, got {seq!r}, "
                                           f"{decoder_seq!r}, {batch!r}")])
    return cost_data(build_report(parse(text_or_path, overrides), dtype, decoder_seq), seq, batch, dtype)


def export(text_or_path, path, weights=None, seed: int = 0, overrides: dict | None = None, opset: int = 18,
           step: bool = False, dtype: str = "float32"):
    """Export a spec to an ONNX file at `path` (opset 18, dynamic batch and sequence axes, named input and
    output), with the weights `compile` builds from `seed`, or those of an artifact `weights` (written by
    `save` / `evodsl compile -o`) or of an HF checkpoint (as `compile`). The file is checked (onnx checker, onnxruntime against torch) before it is
    moved into place; a failure leaves no file. Returns the check's numbers (backends.lower_onnx.ExportResult).
    step=True exports one decoding step of a causal LM instead: the new tokens and the state in, their logits
    and the next state out (backends.onnx_step; README, "One decoding step")."""
    from .backends.lower_onnx import export as onnx_export
    from .backends.lower_torch import lower

    target = Path(path)
    if not target.parent.is_dir():
        raise EvoError([Diagnostic("E401", f"output folder does not exist: {target.parent}")])
    graph = parse(text_or_path, overrides)
    from .backends.lower_onnx import check_memory
    from .report import build_report

    if step:  # a model without a step form is refused before any weight is built
        from .backends.onnx_step import export_step, refusal

        error = refusal(lower(graph, device="meta"), graph)
        if error is not None:
            raise error
    import torch

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise EvoError([Diagnostic("E404", f"unknown dtype {dtype!r}", help="one of: float32, float16, bfloat16")])
    params = build_report(graph, dtype).params()
    check_memory(graph, params * torch_dtype.itemsize, dtype, stream=None if not step else False)  # before any weight is built
    model = _model(graph, seed, weights, dtype=torch_dtype)
    if step:
        return export_step(model, graph, target, opset=opset)
    return onnx_export(model, graph, target, opset=opset, release=True)  # the module is ours: freed for the check


def save(model, path) -> None:
    """Write a compiled model as an artifact: its spec text and state_dict (loads back with `load`).
    The file appears whole or not at all."""
    import torch

    payload = {"format": ARTIFACT_FORMAT, "spec": model.spec, "spec_file": model.spec_file,
               "overrides": dict(getattr(model, "overrides", {})), "state_dict": model.state_dict()}
    from ._files import write_atomic

    write_atomic(path, lambda tmp: torch.save(payload, tmp))


def load(path, device=None):
    """Load an artifact written by `save` (or `evodsl compile -o`): rebuilds the spec, loads the weights."""
    import torch

    try:
        payload = torch.load(path, map_location=device or "cpu", weights_only=True)
    except OSError as err:
        raise EvoError([Diagnostic("E401", f"cannot read artifact {str(path)!r}: {err.strerror or err}")]) from None
    except Exception as err:  # noqa: BLE001 - torch raises many types for a file that is not a checkpoint
        raise EvoError([Diagnostic("E403", f"{path} is not an evodsl artifact ({type(err).__name__})",
                                   help="artifacts are written by `evodsl compile SPEC -o FILE`")]) from None
    if not (isinstance(payload, dict) and payload.get("format") == ARTIFACT_FORMAT
            and {"spec", "spec_file", "state_dict"} <= payload.keys()):
        raise EvoError([Diagnostic("E403", f"{path} is not an evodsl artifact ({ARTIFACT_FORMAT})",
                                   help="artifacts are written by `evodsl compile SPEC -o FILE`")])
    from .backends.lower_torch import lower

    graph = parse(payload["spec"], payload.get("overrides"))
    model = lower(graph, device=device, spec=payload["spec"], file=payload["spec_file"])
    model.overrides = graph.overrides
    model.load_state_dict(payload["state_dict"])
    return model
