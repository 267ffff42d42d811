"""ONNX backend: the torch module that `evodsl.compile` builds, exported with torch's dynamo ONNX exporter
(opset 18), with dynamic batch and sequence axes and named inputs and outputs, then checked: the ONNX checker
(full_check) and an onnxruntime run against the torch module. The file appears whole or not at all.

Opset 18 is used because onnxruntime runs every op the exporter emits at 18, and every deployment runtime
in use reads it; the newer fused ops (opset 23 Attention, RotaryEmbedding, RMSNormalization) are not emitted
by the exporter for our modules, and our variants (banded, adaptive-span, linear attention) have no fused
standard op anyway, so the graph is made of standard MatMul / Softmax / Gather / DFT ops.
"""
from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evodsl import progress
from evodsl.backends.lower_torch import extra_inputs, forward_args
from evodsl.diagnostics import Diagnostic, EvoError
from evodsl.ir import Graph

OPSET = 18
TWO_GB = 2 * 1024**3
# Peak memory of an export, in units of the weights' bytes: the module's own weights plus about 3 more copies
# that torch 2.13's dynamo ONNX exporter holds while it builds and writes the graph (measured on GPT-2 at 2, 12
# and 24 layers: RSS grows 3.05x the weights, BENCHMARKS.md), plus a margin.
EXPORT_MEMORY_FACTOR = 4.2
# A streamed export (backends/onnx_stream.py, weights of 2 GiB and more) holds the weights once, plus the graph
# and onnxruntime's check: the weights and this margin.
STREAM_MARGIN = 2 * 1024**3


@dataclass
class ExportResult:
    path: Path
    input_name: str
    output_name: str
    max_abs_diff: float
    output_scale: float
    external_data: bool
    bytes: int
    input_names: tuple = ()  # every input, in order (input_ids, attention_mask, ...)
    output_names: tuple = ()  # every output, in order (a step export: logits, present.*)
    dims: dict | None = None  # a step export: each input's and output's axes as written ('batch', 'past_seq', 8)
    state_rel_diff: float | None = None  # a step export: the largest difference of a present.* tensor / its scale
    opset: int = OPSET


def io_names(graph: Graph) -> tuple[str, str]:
    """input_ids -> logits for LMs; features -> hidden_states / pooled / output otherwise."""
    inp = "input_ids" if graph.input.variant == "tokens" else "features"
    last = graph.node(graph.output.inputs[0])
    out = {("head", "lm"): "logits", ("head", "pooler"): "pooled", ("head", "linear"): "output"}.get(
        (last.family, last.variant), "hidden_states")
    return inp, out


def example_args(graph: Graph, batch: int, seq: int, seed: int = 0, decoder_seq: int | None = None) -> tuple:
    """The forward's arguments, in its order (None where the model takes none): the input(s), then each input's
    attention mask (its last row right-padded to half its length) and token_type_ids (segment 0, then 1 if the
    model has it). A model with two inputs gets a second of `decoder_seq` tokens (default: seq - 1, so that n and m
    differ)."""
    m = decoder_seq or max(2, seq - 1)
    lengths = {"input_ids": seq, "attention_mask": seq, "token_type_ids": seq, "decoder_input_ids": m,
               "decoder_attention_mask": m}
    taken = set(extra_inputs(graph))
    out = []
    for k, name in enumerate(forward_args(graph)):
        L = lengths[name]
        if k == 0:
            out.append(example_input(graph, batch, seq, seed))
        elif name == "decoder_input_ids":
            out.append(example_input(graph, batch, m, seed + 1, graph.inputs[1]))
        elif name not in taken:
            out.append(None)
        elif name.endswith("attention_mask"):
            mask = torch.ones(batch, L, dtype=torch.long)
            mask[-1, max(1, L // 2):] = 0
            out.append(mask)
        else:  # token_type_ids: segment 1 only where the model has a second one (HF's type_vocab_size=1: YOSO)
            two = any(c.family == "embed" and getattr(c.params, "segments", 0) > 1 for c in graph.calls())
            types = torch.full((batch, L), int(two), dtype=torch.long)
            types[:, : L // 2] = 0
            out.append(types)
    return tuple(out)


def input_names(graph: Graph) -> list[str]:
    """The exported model's inputs, in order: the forward's arguments it takes (features for feature input)."""
    taken = set(extra_inputs(graph))
    names = [a for k, a in enumerate(forward_args(graph)) if k == 0 or a in taken]
    return [io_names(graph)[0], *names[1:]]


def example_input(graph: Graph, batch: int, seq: int, seed: int = 0, node=None) -> torch.Tensor:
    """Random token ids (or features) for the graph's first input, or for input `node`."""
    g = torch.Generator().manual_seed(seed)
    node = node or graph.inputs[0]
    shape = node.meta["shape"]
    if len(shape) == 2:
        return torch.randint(0, node.params.vocab, (batch, seq), generator=g)
    return torch.randn(batch, seq, shape[-1], generator=g)


def min_positions(graph: Graph) -> int:
    """The shortest input the model takes: slice(last=k) and slice(first=k) keep k positions, a drop leaves one."""
    from evodsl.ops.slice.seq import shortest_input

    return max([2] + [shortest_input(n.params) for n in graph.calls() if n.family == "slice"])


def max_positions(graph: Graph) -> int | None:
    """The longest sequence the model accepts (a learned position table, axial's n1 * n2 grid), or None."""
    from evodsl.ops.cost import length

    caps = []
    for n in graph.calls():
        if (n.family, n.variant) in (("pos", "learned"), ("pos", "axial")):  # n + k positions: n <= max_len - k
            seq = length(n.meta["shape"][1])
            top = n.params.max_len if n.variant == "learned" else n.params.n1 * n.params.n2
            caps.append(top - int(seq.subs({s: 0 for s in seq.free_symbols})))
    return min(caps) if caps else None


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def streams(param_bytes: int) -> bool:
    from evodsl.backends.onnx_stream import STREAM_FROM

    return param_bytes >= STREAM_FROM


def check_memory(graph: Graph, param_bytes: int, dtype: str = "float32", stream: bool | None = None,
                 built: bool = False) -> None:
    """Refuse, with the numbers, an export this machine cannot hold (`param_bytes` in the export's dtype;
    `stream`: whether the export streams its weights, by default from 2 GiB; a step export does not; `built`:
    the module's weights are already in memory, so only what the export adds must be available)."""
    stream = streams(param_bytes) if stream is None else stream
    need = param_bytes + STREAM_MARGIN if stream else int(param_bytes * EXPORT_MEMORY_FACTOR)
    need -= param_bytes if built else 0
    have = _available_memory()
    if have is not None and need > have:
        gib = lambda x: f"{x / 2**30:.1f} GiB"  # noqa: E731
        how = ("the export streams them into the file, and onnxruntime's check maps that file once the torch "
               "module is released: they are held about once, plus a margin for the graph and the check" if stream
               else "torch's ONNX exporter holds about 3 more copies while it builds and writes the graph")
        raise EvoError([Diagnostic(
            "E405", f"exporting '{graph.name}' needs about {gib(need)}{' more' if built else ''} of memory; this "
                    f"machine has {gib(have)} available",
            help=f"its weights alone are {gib(param_bytes)} ({dtype}){', already built' if built else ''}; {how}; export a smaller configuration "
                 f"(--set d_model=... --set layers=...) or in float16 here, or run the export on a machine with "
                 f"more memory")])


@contextlib.contextmanager
def _quiet():
    """The exporter logs its progress and optional-package notes; the CLI prints its own summary."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _failure(err: Exception, graph: Graph) -> EvoError:
    text = f"{type(err).__name__}: {err}"
    modules = sorted({m for m in re.findall(r"\b(?:blocks\.\d+\.)?[a-z_]+\d*\b", text)
                      if m.split(".")[-1] in {n.module for n in graph.calls()}})
    ops = sorted(set(re.findall(r"aten[.:]+[A-Za-z0-9_.]+", text)))
    where = f" in {', '.join(modules[:3])}" if modules else ""
    what = f" (op {', '.join(ops[:3])})" if ops else ""
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    guards = re.findall(r"satisfy the generated guard (.+?)\.?$", str(err), flags=re.M)
    if guards:  # torch.export's constraint violation: the traced graph holds for some input sizes only
        first = (f"the traced graph holds only where {guards[0][:200]} (L['input_ids'].size()[0] is the batch, [1] the "
                 f"sequence length), not at every batch and sequence length; the file would be wrong elsewhere")
    return EvoError([Diagnostic("E406", f"ONNX export failed{where}{what}: {first}",
                                help="no file was written; report this with the spec, it is a gap in the "
                                     "ONNX lowering")])


def _dft_in_double(path: Path) -> None:
    """Run every DFT of the saved model in float64 (Cast in, CastLike back). onnxruntime's float32 DFT is
    accurate for power-of-two lengths only: at other lengths its error grows with the length (relative 2e-5
    at n = 70, 6e-5 at n = 257 for a [70, 64] fft2, 2e-4 in FNet's output after the LayerNorms, against 3e-6
    for torch in float32); in float64 it is 4e-8 at every length. The weights stay where they are."""
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.load(str(path), load_external_data=False)
    nodes = []
    for k, node in enumerate(proto.graph.node):
        if node.op_type != "DFT":
            nodes.append(node)
            continue
        x, y = node.input[0], node.output[0]
        node.input[0], node.output[0] = f"{x}__f64_{k}", f"{y}__f64_{k}"
        nodes += [helper.make_node("Cast", [x], [node.input[0]], to=TensorProto.DOUBLE), node,
                  helper.make_node("CastLike", [node.output[0], x], [y])]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    onnx.save(proto, str(path))


def export(model: torch.nn.Module, graph: Graph, path, opset: int = OPSET, verify_seq: int = 8,
           stream: bool | None = None, release: bool = False) -> ExportResult:
    """Export `model` (built from `graph`) to `path`, check it, and compare onnxruntime with torch. `stream`
    (default: weights of 2 GiB and more) traces the graph without weights and streams them into external data
    (backends/onnx_stream.py); `release` frees the module's weights (moved to the meta device) once the file is
    written, before onnxruntime loads it, so that the check does not hold them twice."""
    import onnx
    import onnxruntime as ort

    path = Path(path)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    stream = streams(param_bytes) if stream is None else stream
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    check_memory(graph, param_bytes, str(dtype).removeprefix("torch."), stream, built=True)
    inp_name, out_name = io_names(graph)
    cap = max_positions(graph)
    least = min_positions(graph)
    seq = max(min(16, cap) if cap else 16, least)
    args = example_args(graph, 2, seq)
    names = input_names(graph)
    batch = torch.export.Dim("batch", min=1, max=4096)
    length = torch.export.Dim("seq", min=least, max=cap or 1 << 20)
    decoder_length = torch.export.Dim("decoder_seq", min=2, max=cap or 1 << 20)
    dynamic = {arg: (None if a is None else {0: batch, 1: decoder_length if arg.startswith("decoder") else length})
               for arg, a in zip(forward_args(graph), args)}
    external = param_bytes >= TWO_GB or stream
    verify = max(verify_seq, least)
    xs = example_args(graph, 2, min(verify, cap) if cap else verify, seed=1)
    progress.phase("running torch for the check")
    with torch.no_grad():  # torch's answer first: with `release`, the module is gone when onnxruntime runs
        want = model(*xs).float().numpy()
    progress.phase("exporting the graph")
    tmpdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        tmp = tmpdir / path.name
        if stream:
            from evodsl.backends.onnx_stream import write_streamed

            try:
                with warnings.catch_warnings(), torch.no_grad(), _quiet():
                    warnings.simplefilter("ignore")
                    write_streamed(model, graph, args, dynamic, names, [out_name], tmp, opset)
                    if any(n.op_type == "DFT" for n in onnx.load(str(tmp), load_external_data=False).graph.node):
                        _dft_in_double(tmp)
            except Exception as err:  # noqa: BLE001 - the exporter raises many types; the user gets one error
                raise _failure(err, graph) from None
        else:
            write_onnx(model, args, dynamic, names, [out_name], tmp, opset, external, graph)
        if release:
            model.to("meta")
            gc.collect()
        try:
            progress.phase("checking the file (onnx.checker, onnxruntime)")
            onnx.checker.check_model(str(tmp), full_check=True)
            opts = ort.SessionOptions()
            if stream:  # the check of a big model: no prepacked (copied) weights, no layout-changing rewrites
                opts.add_session_config_entry("session.disable_prepacking", "1")
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
                # a float16 graph runs its MatMuls in float32 on the CPU: onnxruntime casts each weight. In
                # its default order every cast of an initializer may run first, and the arena keeps what
                # they took: +2 W at the peak. Priority order runs each cast just before its MatMul, and
                # without the arena its buffer is returned when used (BENCHMARKS.md, the 7B export)
                opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
                opts.enable_cpu_mem_arena = False
            session = ort.InferenceSession(str(tmp), opts, providers=["CPUExecutionProvider"])
            got = session.run(None, {k: v.numpy() for k, v in zip(names, [a for a in xs if a is not None])})[0]
        except Exception as err:  # noqa: BLE001 - checker and onnxruntime errors: one EvoError, no file
            raise EvoError([Diagnostic("E407", f"the exported ONNX model failed its own check: "
                                               f"{type(err).__name__}: {str(err).strip()[:300]}",
                                       help="no file was written; this is a bug in the ONNX lowering")]) from None
        got = got.astype(np.float32)
        # with a padding mask, the real positions only: a padded one's output is no one's business (torch's
        # causal ops skip a right-padded mask; ONNX applies it); an encoder-decoder's output is the target's
        real = dict(zip(forward_args(graph), xs)).get(
            "decoder_attention_mask" if len(graph.inputs) > 1 else "attention_mask")
        if real is not None and want.ndim >= 3:  # an output of the last positions only: theirs (Perceiver AR)
            real = real[:, real.shape[1] - want.shape[1]:]
            got, want = got[real.bool().numpy()], want[real.bool().numpy()]
        diff = float(np.abs(got - want).max())
        scale = float(np.abs(want).max())
        size = move_into_place(tmpdir, path)
        return ExportResult(path, inp_name, out_name, diff, scale, external, size, tuple(names), opset=opset)
    finally:
        progress.done()
        shutil.rmtree(tmpdir, ignore_errors=True)


def write_onnx(module: torch.nn.Module, args: tuple, dynamic, names: list, out_names: list, tmp: Path, opset: int,
               external: bool, graph: Graph) -> None:
    """torch.export `module` at `args` with `dynamic` shapes, then the dynamo ONNX exporter, saved at `tmp`
    (every DFT in float64); any exporter failure is one EvoError (E406)."""
    try:
        with warnings.catch_warnings(), torch.no_grad(), _quiet():
            warnings.simplefilter("ignore")
            # torch.export first, so that a graph valid for some lengths only is an error: given the module,
            # torch.onnx.export turns such guards (a branch on n % chunk, say) into runtime asserts that
            # the ONNX graph drops, and the file is silently wrong at the other lengths
            from evodsl.ops.position.rope import fused_rotary

            with fused_rotary(opset >= 23):  # RotaryEmbedding is an op from opset 23
                exported = torch.export.export(module.eval(), args, dynamic_shapes=dynamic, strict=False)
            program = torch.onnx.export(exported, args, dynamo=True, opset_version=opset,
                                        input_names=names, output_names=out_names, verbose=False)
            program.save(str(tmp), external_data=external)
            if any(node.op_type == "DFT" for node in program.model.graph):
                _dft_in_double(tmp)
    except EvoError:
        raise
    except Exception as err:  # noqa: BLE001 - the exporter raises many types; the user gets one error
        raise _failure(err, graph) from None


def move_into_place(tmpdir: Path, path: Path) -> int:
    """Move the checked model and its external data from `tmpdir` beside `path`, together; their bytes."""
    files = list(tmpdir.iterdir())
    for f in files:
        os.replace(f, path.parent / f.name)
    return sum((path.parent / f.name).stat().st_size for f in files)
