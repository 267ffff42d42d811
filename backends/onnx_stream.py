"""Exporting a model too large to copy: the graph traced without weights, the weights streamed into the file.

torch's ONNX exporter, given the module, holds about three more copies of the weights while it builds, folds and
writes the graph (BENCHMARKS.md). Here the same spec is lowered on the meta device (no storage), torch.export and
the dynamo exporter trace that (without the optimizer's constant folding, which would read the weights), and
each initializer of the traced graph is then given a lazy value that reads the real module's tensor of the same
name only when the file is written: one tensor at a time goes from the module to external data. The export
then holds the module's weights and the graph, nothing more. onnxruntime folds the weight transposes the
optimizer would have folded when it loads the file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from evodsl.ir import Graph

STREAM_FROM = 2 * 1024**3  # weights of 2 GiB and more: external data, streamed


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def write_streamed(module: torch.nn.Module, graph: Graph, args: tuple, dynamic, names: list, out_names: list,
                   tmp: Path, opset: int) -> None:
    """Write `module` as `tmp` + `tmp.data` (external data), its weights read one at a time."""
    import onnx_ir as ir

    from evodsl.backends.lower_torch import lower

    dtype = next((p.dtype for p in module.parameters()), torch.float32)
    meta = lower(graph, device="meta", dtype=dtype).eval()
    meta_args = tuple(None if a is None else a.to("meta") for a in args)
    from evodsl.ops.position.rope import fused_rotary

    with fused_rotary(opset >= 23):  # RotaryEmbedding is an op from opset 23
        exported = torch.export.export(meta, meta_args, dynamic_shapes=dynamic, strict=False)
    program = torch.onnx.export(exported, meta_args, dynamo=True, opset_version=opset, input_names=names,
                                output_names=out_names, verbose=False, optimize=False)
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    for name, init in program.model.graph.initializers.items():
        if name not in tensors:
            raise RuntimeError(f"the traced graph has an initializer {name!r} that the module does not hold")
        meta_value, source = init.const_value, tensors[name]
        init.const_value = ir.LazyTensor(lambda t=source: ir.tensor(_numpy(t)), dtype=meta_value.dtype,
                                         shape=meta_value.shape, name=name)
    ir.save(program.model, str(tmp), external_data=tmp.name + ".data")
